"""Synthetic steps through the real model: the memory plan's worst case and the warm-up.

Nothing here touches the scheduler or the block manager: the steps write only pages of the KV
cache they are given (a scratch cache for the plan; pages of the real pool for the warm-up, which
no sequence owns yet and which a sequence always writes before it reads), and their token ids,
pixels and image sizes are made up, so the outputs mean nothing; shapes and code paths are real.
"""

from __future__ import annotations

import torch

from fastllava.config import LlavaConfig, TextConfig
from fastllava.kv_cache import KVCache, kv_storage_dtype
from fastllava.models.context import ForwardContext
from fastllava.preprocess.anyres import anyres_grid, anyres_num_tokens
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.cuda_graphs import batch_buckets
from fastllava.runtime.sampler import SamplingBatch, sample


ImageShape = tuple[int, "tuple[int, int] | None", tuple[int, int], int]


def image_shapes(config: LlavaConfig) -> list[ImageShape]:
    """(tiles, grid, image (h, w), image tokens) for every tile count the checkpoint's
    preprocessing can produce, fewest tiles first: one for LLaVA-1.5; for anyres the base tile plus
    each pinpoint's grid, at an image the size of the pinpoint (no unpadding: the most tokens)."""
    tile = config.vision.image_size
    if config.kind == "llava":
        return [(1, None, (tile, tile), config.tokens_per_tile)]
    shapes = {}
    for hw in config.pinpoints:
        gh, gw = anyres_grid(hw, config.pinpoints, tile)
        n = anyres_num_tokens(hw, config.pinpoints, tile, config.vision.patch_size,
                              config.tokens_per_tile)
        if n > shapes.get(1 + gh * gw, (None, None, 0))[2]:
            shapes[1 + gh * gw] = ((gh, gw), tuple(hw), n)
    return [(tiles, *shapes[tiles]) for tiles in sorted(shapes)]


class DummySteps:
    def __init__(self, model, ops, rc: RuntimeConfig, dtype: torch.dtype, device,
                 text: TextConfig | None = None):
        """text: the KV cache's view of the decoder (tensor parallelism: this rank's KVH/N
        heads); default the model's."""
        self.model, self.ops, self.rc = model, ops, rc
        self.config: LlavaConfig = model.config
        self.text = text or model.config.text
        self.dtype, self.device = dtype, torch.device(device)
        self.kv_dtype = kv_storage_dtype(rc.kv_cache_dtype, dtype)   # the pages' dtype
        self.max_positions = min(rc.max_context, self.config.text.max_position_embeddings)

    @property
    def scratch_pages(self) -> int:
        """Pages for one full prefill step plus one page per decoding sequence."""
        return -(-self.rc.max_num_batched_tokens // self.rc.page_size) + self.rc.max_num_seqs + 1

    def scratch_kv(self) -> KVCache:
        t = self.text
        return KVCache(t.num_hidden_layers, self.scratch_pages, self.rc.page_size,
                       t.num_key_value_heads, t.head_dim, self.kv_dtype, self.device,
                       self.model.kv_scales)

    def images(self, tiles: int, grid, image_hw) -> torch.Tensor:
        """One image of `tiles` tiles through the tower and projector → (tokens, hidden)."""
        side = self.config.vision.image_size
        pixels = torch.randn(tiles, 3, side, side, device=self.device)
        return self.model.encode_images(self.ops, [pixels], [image_hw], [grid])[0]

    def prefill(self, kv: KVCache, num_tokens: int, num_seqs: int, *, prefix: int = 0,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """num_tokens new tokens split over num_seqs sequences (each after `prefix` cached
        tokens), the first rows taking `features` as image embeddings → logits (num_seqs, V)."""
        S = kv.page_size
        # No position past what a request may reach (rotary tables end there): more, shorter
        # sequences when one would not fit.
        room = self.max_positions - prefix
        num_seqs = max(1, min(max(num_seqs, -(-num_tokens // room)), num_tokens))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        width = -(-(prefix + max(lens)) // S)
        tables = [[(b * width + j) % kv.num_pages for j in range(width)] for b in range(num_seqs)]
        positions, slots, cu = [], [], [0]
        for b, n in enumerate(lens):
            positions += range(prefix, prefix + n)
            slots += [tables[b][t // S] * S + t % S for t in range(prefix, prefix + n)]
            cu.append(cu[-1] + n)
        ctx = self._context(True, positions, slots, tables, cu, [prefix] * num_seqs,
                            [prefix + n for n in lens], [c - 1 for c in cu[1:]])
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        mask = None
        if features is not None:
            n = min(features.shape[0], num_tokens)
            features = features[:n]
            mask = torch.arange(num_tokens, device=self.device) < n
        return self.model(self.ops, self.model.embed(ids, mask, features), ctx, kv)

    def decode(self, kv: KVCache, num_seqs: int, context: int = 1) -> torch.Tensor:
        """One token per sequence after context - 1 cached ones → logits (num_seqs, V)."""
        S = kv.page_size
        width = -(-context // S)
        tables = [[(b * width + j) % kv.num_pages for j in range(width)] for b in range(num_seqs)]
        p = context - 1
        slots = [t[p // S] * S + p % S for t in tables]
        ctx = self._context(False, [p] * num_seqs, slots, tables, list(range(num_seqs + 1)),
                            [p] * num_seqs, [context] * num_seqs, list(range(num_seqs)))
        ids = torch.zeros(num_seqs, dtype=torch.int64, device=self.device)
        return self.model(self.ops, self.model.embed(ids, None, None), ctx, kv)

    def sample(self, logits: torch.Tensor, *, greedy: bool) -> torch.Tensor:
        rows = [(0.0 if greedy else 1.0, 1.0 if greedy else 0.9, i, 0)
                for i in range(logits.shape[0])]
        return sample(logits, SamplingBatch.build(rows, self.device))

    def decode_and_sample(self, kv: KVCache) -> None:
        """The CUDA-graph pool's worst case: a decode at max_num_seqs rows, then the top-p sampler
        over its logits (the largest sampler graph: its (B, V) temporaries outweigh a decode
        forward's own activations many times over), while the pool also holds what every
        smaller bucket's graphs keep in it (`kept_graph_outputs`)."""
        logits = self.decode(kv, self.rc.max_num_seqs)
        kept = kept_graph_outputs(self.rc.max_num_seqs, logits.shape[1], self.device)
        self.sample(logits, greedy=False)
        del kept

    def worst_case(self, kv: KVCache) -> None:
        """The largest step the scheduler can form: the most tiles through the tower, a full
        max_num_batched_tokens prefill over max_num_seqs sequences holding those features, and
        the top-p sampler over all their logits."""
        tiles, grid, hw, _ = image_shapes(self.config)[-1]
        feats = self.images(tiles, grid, hw)
        logits = self.prefill(kv, self.rc.max_num_batched_tokens, self.rc.max_num_seqs,
                              features=feats)
        self.sample(logits, greedy=False)

    def _context(self, is_prefill, positions, slots, tables, cu, prefix_lens, context_lens,
                 logits_rows) -> ForwardContext:
        i32 = dict(dtype=torch.int32, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        return ForwardContext(
            is_prefill=is_prefill, positions=torch.tensor(positions, **i64),
            slot_mapping=torch.tensor(slots, **i64), block_tables=torch.tensor(tables, **i32),
            cu_seqlens=torch.tensor(cu, **i32), prefix_lens=torch.tensor(prefix_lens, **i32),
            context_lens=torch.tensor(context_lens, **i32),
            logits_rows=torch.tensor(logits_rows, **i64), has_prefix=any(prefix_lens))


def kept_graph_outputs(max_num_seqs: int, vocab: int, device) -> list[torch.Tensor]:
    """Tensors the size of the outputs each bucket below the largest keeps in the shared graph
    pool after its capture (DecodeGraphs.outputs: fp32 logits (bs, V) and greedy ids;
    .sampled: the ids of both sampler graphs): ~0.5 GB at 256 rows and a 64k vocabulary, which a
    measurement of the largest bucket alone would miss."""
    return [t for bs in batch_buckets(max_num_seqs)[:-1]
            for t in (torch.empty(bs, vocab, device=device),
                      torch.empty(3, bs, dtype=torch.int64, device=device))]


def warm_up(steps: DummySteps, kv: KVCache, decode_batches: list[int]) -> None:
    """Run every kernel variant a served step can meet, so none compiles after ready: the tower
    at each tile count; prefill without and with a cached prefix at 1, 17 and the full
    max_num_batched_tokens new tokens (1 and odd counts are what Triton would specialize, had
    a per-step int slipped through do_not_specialize); decode at `decode_batches` (none when
    CUDA graphs already ran it at capture) over a one-token and a multi-split context; the
    sampler greedy and top-p at 1 and max_num_seqs rows."""
    for tiles, grid, hw, _ in image_shapes(steps.config):
        steps.images(tiles, grid, hw)
    S, rc = kv.page_size, steps.rc
    for n in sorted({1, min(17, rc.max_num_batched_tokens), rc.max_num_batched_tokens}):
        for prefix in (0, min(S + 1, steps.max_positions - 1)):
            steps.prefill(kv, n, min(n, rc.max_num_seqs), prefix=prefix)
    for B in decode_batches:
        for context in (1, max(1, min(kv.num_pages * S // B, 64 * S, steps.max_positions))):
            steps.decode(kv, B, context)
    for B in sorted({1, rc.max_num_seqs}):
        logits = torch.randn(B, steps.config.text.vocab_size, device=steps.device)
        for greedy in (True, False):
            steps.sample(logits, greedy=greedy)
