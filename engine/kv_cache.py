"""The paged KV cache tensors: fixed-size pages shared by all sequences.

Per layer k[i], v[i]: (P, S, KVH, D). A sequence's token t lives in page block_table[t // S] at
offset t % S, i.e. slot block_table[t // S] * S + t % S. Which page belongs to whom is decided by
`fastllava.runtime.block_manager` (no torch); this class only holds the memory.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_pages = num_pages
        self.page_size = page_size

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype.itemsize
