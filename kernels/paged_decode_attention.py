"""Decode attention: one new query token per sequence over its paged KV cache.

Sequence b's keys/values are the first context_lens[b] slots of the pages listed in
block_tables[b] (its own new token included: the KV write runs first). GQA as in prefill.
Numerics: transformers' eager attention, as in prefill_attention.attend_ref.
Shapes: q (B, H, D); k_cache, v_cache (P, S, KVH, D); block_tables (B, max_pages) int;
context_lens (B,) int; out (B, H, D).
"""

from __future__ import annotations

import torch

from fastllava.kernels.prefill_attention import attend_ref, gather_pages


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                               scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = gather_pages(k_cache, block_tables[b], length).to(q.dtype)
        v = gather_pages(v_cache, block_tables[b], length).to(q.dtype)
        out[b] = attend_ref(q[b:b + 1], k, v, scale, None)[0]
    return out
