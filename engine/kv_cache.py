"""The paged KV cache: fixed-size pages shared by all sequences, a block table per sequence.

Per layer k[i], v[i]: (P, S, KVH, D). A sequence's token t lives in page block_table[t // S] at
offset t % S, i.e. slot block_table[t // S] * S + t % S. Pages come from a free list; a sequence
holds ceil(len / S) of them and returns them all when it ends.
"""

from __future__ import annotations

import torch


class OutOfPagesError(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size = page_size
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place so that it covers `num_tokens` tokens."""
        need = -(-num_tokens // self.page_size) - len(block_table)
        if need > len(self.free_pages):
            raise OutOfPagesError(f"KV cache full: need {need} more pages, {len(self.free_pages)} free")
        for _ in range(max(need, 0)):
            block_table.append(self.free_pages.pop())

    def free(self, block_table: list[int]) -> None:
        self.free_pages.extend(reversed(block_table))
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        S = self.page_size
        return [block_table[t // S] * S + t % S for t in range(start, end)]
