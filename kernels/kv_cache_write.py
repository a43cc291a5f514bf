"""Scatter new K/V rows into the paged KV cache.

Cache layout (per layer): k_cache, v_cache (P, S, KVH, D) — P pages of S token slots each. A token's
slot is page * S + offset; `slot_mapping` (N,) gives each new row's slot, and -1 marks a padding row
(CUDA-graph padding, chunk tails) that must be skipped. Exact: a pure copy.
Shapes: k, v (N, KVH, D); slot_mapping (N,) int.
"""

from __future__ import annotations

import torch


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    P, S, KVH, D = k_cache.shape
    k_cache.view(P * S, KVH, D)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(P * S, KVH, D)[slots] = v[keep].to(v_cache.dtype)
