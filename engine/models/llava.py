"""LLaVA-1.5 and LLaVA-NeXT: vision tower → mlp2x_gelu projector → (anyres packing) → decoder.

Image features replace, in order, the embeddings of the image placeholder tokens of the prompt.
LLaVA-1.5: one tile → tokens_per_tile features. LLaVA-NeXT: base tile + grid tiles; the grid is
re-assembled spatially, the padding rows/columns that anyres added are cut off (unpad), and an
`image_newline` vector is appended after every remaining row (llava-reference.md §4.4).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fastllava.config import LlavaConfig
from fastllava.kernels.gelu import ACTIVATIONS
from fastllava.kv_cache import KVScales
from fastllava.models.context import ForwardContext
from fastllava.models.llama import LlamaModel
from fastllava.models.vision_tower import VisionTower
from fastllava.preprocess.anyres import unpad_window


class Projector(nn.Module):
    """linear_1 → projector_hidden_act (exact erf GELU in every LLaVA checkpoint) → linear_2,
    in the model dtype."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        hidden = config.text.hidden_size
        self.linear_1 = nn.Linear(config.vision_feature_size, hidden, bias=config.projector_bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=config.projector_bias)
        self.act = ACTIVATIONS[config.projector_act]

    def forward(self, ops, x):
        return self.linear_2(ops.gelu(self.linear_1(x), self.act))


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.multi_modal_projector = Projector(config)
        if config.kind == "next":
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        self.language_model = LlamaModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        # Calibrated fp8 KV-cache scales per decoder layer, from a checkpoint that stores them
        # (weights/kv_scales.py); None: 1.0. Used only when the KV cache is fp8.
        self.kv_scales: KVScales | None = None
        # The tower stops at the deepest selected layer: the checkpoint's later layers are
        # deliberately not held (the weight loader asks; the key maps already ignore
        # post_layernorm and SigLIP's pooling head).
        self._unused_layer = re.compile(r"vision_tower\.layers\.(\d+)\..*")

    def is_unused_weight(self, name: str) -> bool:
        m = self._unused_layer.fullmatch(name)
        return m is not None and int(m.group(1)) >= self.config.num_vision_layers_run

    def reset_buffers(self):
        """After `to_empty` (which gives every parameter new storage): recompute buffers and
        re-tie lm_head to the embedding table when the config ties them."""
        self.language_model.reset_buffers()
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # ---- images -------------------------------------------------------------------------------
    def encode_images(self, ops, pixel_values: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                      grids: list[tuple[int, int] | None]) -> list[torch.Tensor]:
        """Per image: pixels (tiles, 3, S, S) → features (num_image_tokens, hidden).
        All tiles of all images run through the tower as one batch."""
        counts = [p.shape[0] for p in pixel_values]
        feats = self.vision_tower(ops, torch.cat(pixel_values))          # (tiles, T, Dv*k)
        feats = self.multi_modal_projector(ops, feats)                   # (tiles, T, hidden)
        out = []
        for f, size, grid in zip(feats.split(counts), image_sizes, grids):
            out.append(f.flatten(0, 1) if grid is None else self._pack_anyres(f, size, grid))
        return out

    def _pack_anyres(self, f: torch.Tensor, image_size, grid) -> torch.Tensor:
        """f (1 + gh*gw, g*g, hidden): base tile first, then grid tiles row-major."""
        base, tiles = f[0], f[1:]
        gh, gw = grid
        g = self.config.vision.patches_per_side
        hidden = f.shape[-1]
        if tiles.shape[0] == 0:  # a pinpoint equal to one tile: transformers appends one newline
            return torch.cat((base, self.image_newline[None].to(base.dtype)))
        # (gh, gw, g, g, D) → (gh, g, gw, g, D) → rows (gh*g) x cols (gw*g) of feature cells
        grid_feats = tiles.reshape(gh, gw, g, g, hidden).permute(0, 2, 1, 3, 4)
        grid_feats = grid_feats.reshape(gh * g, gw * g, hidden)
        top, bottom, left, right = unpad_window(image_size, gh * g, gw * g)
        grid_feats = grid_feats[top:bottom, left:right]                  # (rows, cols, D)
        rows = grid_feats.shape[0]
        newline = self.image_newline.to(f.dtype).expand(rows, 1, hidden)
        packed = torch.cat((grid_feats, newline), dim=1).reshape(-1, hidden)  # newline ends each row
        return torch.cat((base, packed))

    # ---- text ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None,
              image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids (N,) → embeddings (N, hidden) with image features scattered in order into the
        positions flagged by image_mask (their ids may be a sentinel outside the vocabulary).

        The caller guarantees one feature row per flagged position (the runner checks it on the
        host): counting the flags here would read the mask back, a host sync per image step on
        a GPU, and so would `embeds[mask] = ...` (a boolean index runs nonzero()). masked_scatter
        fills the flagged rows in order from the features with no sync, the same values."""
        if image_mask is None:
            return self.language_model.embed_tokens(input_ids)
        if image_features is None:
            raise ValueError("image_mask given without image_features")
        ids = input_ids.masked_fill(image_mask, 0)
        embeds = self.language_model.embed_tokens(ids)
        return embeds.masked_scatter_(image_mask[:, None], image_features.to(embeds.dtype))

    def forward(self, ops, embeds: torch.Tensor, ctx: ForwardContext, kv_cache) -> torch.Tensor:
        """One step over packed tokens → fp32 logits (B, vocab) of the rows in ctx.logits_rows.
        lm_head runs in the model dtype (as transformers), then logits are cast to fp32."""
        hidden = self.language_model(ops, embeds, ctx, kv_cache)
        return self.lm_head(hidden[ctx.logits_rows]).float()
