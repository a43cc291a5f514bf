"""Attention over packed variable-length sequences (prefill, and the vision towers).

Sequences are packed along N: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] of q/k/v. Each
query attends to its own sequence only — causally for the decoder, bidirectionally for the vision
towers — and, optionally, first to a prefix of `prefix_lens[b]` tokens already in the paged KV cache
(prefix caching, chunked prefill): the new tokens sit at positions prefix_len .. prefix_len + T - 1.
GQA: query head h reads KV head h // (H // KVH) (consecutive query heads share a KV head).

Numerics are transformers' eager attention, rounding point for rounding point: scores = q @ k^T
in the input dtype (fp32 accumulate, rounded), times scale (rounded again), softmax in fp32,
probabilities rounded to the input dtype, then @ v in the input dtype. In bf16 this makes the CPU
path bit-identical to transformers' eager run; flash-style kernels (fp32 scores, online softmax)
are held to the FlashAttention bound against it: at most ~2x the error of this same-dtype run.
Shapes: q (N, H, D); k, v (N, KVH, D); cu_seqlens (B+1,) int; out (N, H, D).
"""

from __future__ import annotations

import torch


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` token rows of one sequence from a paged cache (P, S, KVH, D) → (L, KVH, D)."""
    S = cache.shape[1]
    num_pages = (length + S - 1) // S
    return cache[block_table[:num_pages].long()].flatten(0, 1)[:length]


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | None) -> torch.Tensor:
    """One sequence. q (T, H, D); k, v (L, KVH, D). With causal_offset c, query i sees keys ≤ i + c."""
    T, H, _ = q.shape
    L, KVH, _ = k.shape
    group = H // KVH
    k = k.repeat_interleave(group, dim=1).permute(1, 2, 0)  # (H, D, L)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)   # (H, L, D)
    scores = torch.matmul(q.transpose(0, 1), k) * scale     # (H, T, L), input dtype
    if causal_offset is not None:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + causal_offset, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1)           # (T, H, D)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, causal: bool, scale: float,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        kb, vb = k[lo:hi], v[lo:hi]
        prefix = int(prefix_lens[b]) if prefix_lens is not None else 0
        if prefix:
            kb = torch.cat((gather_pages(k_cache, block_tables[b], prefix).to(k.dtype), kb))
            vb = torch.cat((gather_pages(v_cache, block_tables[b], prefix).to(v.dtype), vb))
        out[lo:hi] = attend_ref(q[lo:hi], kb, vb, scale, prefix if causal else None)
    return out
