"""Shared builders for attention tests: float64 dense attention and a shuffled paged KV cache."""

from __future__ import annotations

import torch

from fastllava.kernels.kv_cache_write import write_kv_ref


def dense(q, k, v, scale, causal, offset=0):
    """float64 attention for one sequence: q (T, H, D), k/v (L, KVH, D)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("thd,lhd->htl", q.double(), k) * scale
    if causal:
        T, L = q.shape[0], k.shape[0]
        mask = torch.arange(L)[None, :] > torch.arange(T)[:, None] + offset
        s = s.masked_fill(mask, float("-inf"))
    return torch.einsum("htl,lhd->thd", s.softmax(-1), v)


def paged(seqs_k, seqs_v, page_size, num_pages, gen):
    """Scatter per-sequence K/V into a shuffled paged cache; returns caches and block tables."""
    KVH, D = seqs_k[0].shape[1:]
    dtype = seqs_k[0].dtype
    # Unused slots hold garbage the attention must never read.
    k_cache = torch.randn(num_pages, page_size, KVH, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page_size, KVH, D, generator=gen).to(dtype)
    free = torch.randperm(num_pages, generator=gen).tolist()
    max_pages = max(-(-k.shape[0] // page_size) for k in seqs_k)
    tables = torch.zeros(len(seqs_k), max_pages, dtype=torch.int32)
    for b, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        pages = [free.pop() for _ in range(-(-k.shape[0] // page_size))]
        tables[b, : len(pages)] = torch.tensor(pages)
        slots = torch.tensor([pages[t // page_size] * page_size + t % page_size
                              for t in range(k.shape[0])])
        write_kv_ref(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache, tables
