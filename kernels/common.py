"""Helpers shared by the kernel launchers: interpreter detection, dot precision, input checks."""

from __future__ import annotations

import os

import torch


# Triton 3.9 contracts a*b+c into one FMA unless told otherwise, and warns that the default flips
# in 3.10. Launchers state it: FMA (one rounding instead of two) is more accurate and faster for
# dots, softmax updates and reductions; rotary opts out because torch rounds its two products
# separately and the kernel is bit-identical to it.
FP_FUSION = True


def interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter (decided at import, see __init__)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs would silently go through TF32 on tensor cores (10-bit
    mantissa); "ieee" keeps fp32 models fp32. 16-bit inputs are exact products either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_last_dim_contiguous(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_attention_inputs(q, k, v, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens,
                           has_prefix: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t, 3)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    N, H, D = q.shape
    if k.shape[0] != N or v.shape != k.shape or k.shape[2] != D:
        raise ValueError(f"k, v must be (N={N}, KVH, D={D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"query heads {H} are not a multiple of KV heads {k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int tensor, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not has_prefix:
        return
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t is None:
            raise ValueError(f"prefix_lens given without {name}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or not k_cache.is_contiguous():
        raise ValueError(f"k_cache/v_cache must be contiguous (P, S, KVH, D), got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache/v_cache must both be in q's dtype {q.dtype} or float8_e4m3fn, "
                         f"got {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache (KVH, D) {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}")
    B = cu_seqlens.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] < B or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be (B={B}, max_pages) row-contiguous, got "
                         f"{tuple(block_tables.shape)}")
    if prefix_lens.shape != (B,):
        raise ValueError(f"prefix_lens must be (B={B},), got {tuple(prefix_lens.shape)}")
