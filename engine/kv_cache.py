"""The paged KV cache tensors: fixed-size pages shared by all sequences.

Per layer k[i], v[i]: (P, S, KVH, D). A sequence's token t lives in page block_table[t // S] at
offset t % S, i.e. slot block_table[t // S] * S + t % S. Which page belongs to whom is decided by
`fastllava.runtime.block_manager` (no torch); this class only holds the memory.

Pages are stored in the model dtype, or in float8_e4m3fn (RuntimeConfig.kv_cache_dtype "fp8": half
the bytes of bf16, so twice the pages in the same memory). An fp8 cache carries one fp32 scale per
layer for keys and one for values (stored value = K / k_scale, see kernels/kv_quant.py): the
checkpoint's calibrated scales when it has them (a compressed-tensors `kv_cache_scheme`, read by
weights/kv_scales.py onto `LlavaModel.kv_scales`), else 1.0 for every layer: a checkpoint without
calibrated KV scales gives nothing better to choose from (vLLM's default too), and e4m3 at scale
1 holds LLaVA's keys and values in its normal range. A cache in the model dtype ignores scales
(its layers report 1.0). Why, and what it costs in accuracy: README "FP8".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastllava.kernels.kv_quant import FP8_KV_DTYPE

DEFAULT_KV_SCALE = 1.0


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """RuntimeConfig.kv_cache_dtype ("auto" | "fp8") → the dtype KV pages are allocated in."""
    return FP8_KV_DTYPE if kv_cache_dtype == "fp8" else model_dtype


class KVScales(NamedTuple):
    """Per-layer dequantization multipliers of an fp8 cache, fp32 numbers: K = stored * k[i]."""
    k: tuple[float, ...]
    v: tuple[float, ...]


class LayerKV(NamedTuple):
    """One decoder layer's view of the cache: what the attention ops take."""
    k: torch.Tensor            # (P, S, KVH, D)
    v: torch.Tensor
    k_scale: float             # dequantized K = stored K * k_scale (fp8 caches; 1.0 otherwise)
    v_scale: float


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, scales: KVScales | None = None):
        """dtype: the storage dtype, the model's or torch.float8_e4m3fn; scales: an fp8 cache's
        per-layer scales (None: 1.0 each), ignored by a cache in the model dtype."""
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_scale = [DEFAULT_KV_SCALE] * num_layers
        self.v_scale = [DEFAULT_KV_SCALE] * num_layers
        if scales is not None and dtype == FP8_KV_DTYPE:
            if len(scales.k) != num_layers or len(scales.v) != num_layers:
                raise ValueError(f"KV scales for {len(scales.k)} / {len(scales.v)} layers, the "
                                 f"cache has {num_layers}")
            self.k_scale, self.v_scale = list(scales.k), list(scales.v)
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype.itemsize
