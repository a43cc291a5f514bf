"""CLIP and SigLIP vision transformers (pre-LN ViT), as transformers runs them for LLaVA.

CLIP:   conv patch embed (no bias) → prepend CLS → + positions → pre_layrnorm → layers
SigLIP: conv patch embed (bias)    →               + positions →                layers
Layer:  x += out_proj(attn(LN1(x)));  x += fc2(act(fc1(LN2(x))))
`forward` returns the hidden states the config selects (index 0 = the embeddings output, i = the
output of layer i), concatenated on the feature dim; layers past the deepest selected one are never
built (feature layer -2 skips CLIP's last layer), and post_layernorm is never applied.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.config import LlavaConfig
from fastllava.kernels.gelu import ACTIVATIONS
from fastllava.models.layers import MergedLinear


class VisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.is_clip = c.kind == "clip"
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         stride=c.patch_size, bias=not self.is_clip)
        if self.is_clip:
            self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)  # (B, P, Dv)
        if self.is_clip:
            x = torch.cat((self.class_embedding.expand(x.shape[0], 1, -1), x), dim=1)  # (B, 1+P, Dv)
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.qkv_proj = MergedLinear(c.hidden_size, (c.hidden_size,) * 3, bias=True)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, ops, x: torch.Tensor) -> torch.Tensor:
        B, T, Dv = x.shape
        q, k, v = self.qkv_proj(x).view(B * T, 3, self.num_heads, self.head_dim).unbind(1)
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=x.device)  # one seq per tile
        o = ops.prefill_attention(q, k, v, cu, causal=False, scale=self.head_dim ** -0.5)
        return self.out_proj(o.reshape(B, T, Dv))


class VisionMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, ops, x):
        return self.fc2(ops.gelu(self.fc1(x), self.act))


class VisionLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, ops, x):
        x = x + self.self_attn(ops, self.layer_norm1(x))
        return x + self.mlp(ops, self.layer_norm2(x))


class VisionTower(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        c = config.vision
        self.embeddings = VisionEmbeddings(c)
        if c.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(config.num_vision_layers_run))
        n = c.num_hidden_layers
        self.selected = tuple(i % (n + 1) for i in config.vision_feature_layers)
        self.drop_cls = config.select_strategy == "default"

    def forward(self, ops, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) float32 → features (B, tokens_per_tile, Dv * num_selected)."""
        x = self.embeddings(pixels)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        # Only the selected hidden states are kept: holding every layer's output would pin
        # layers x tiles x tokens x width activations (142 MB for 5 CLIP-L tiles in bf16).
        kept = {0: x} if 0 in self.selected else {}
        for i, layer in enumerate(self.layers, start=1):
            x = layer(ops, x)
            if i in self.selected:
                kept[i] = x
        feats = torch.cat([kept[i] for i in self.selected], dim=-1)
        return feats[:, 1:] if self.drop_cls else feats
