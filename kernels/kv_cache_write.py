"""Scatter new K/V rows into the paged KV cache.

Cache layout (per layer): k_cache, v_cache (P, S, KVH, D) — P pages of S token slots each. A token's
slot is page * S + offset; `slot_mapping` (N,) gives each new row's slot, and -1 marks a padding row
(CUDA-graph padding, chunk tails) that must be skipped. Exact: a pure copy, or, into a
float8_e4m3fn cache, the quantization of kernels/kv_quant.py with the layer's k_scale / v_scale
(bit-identical to `write_kv_ref`). Shapes: k, v (N, KVH, D); slot_mapping (N,) int.

Kernel: one program per token row copies all KVH * D elements of that row of k and of v (a
(BLOCK_H, BLOCK_D) tile, masked to KVH x D) into its cache slot, casting to the cache dtype with
round-to-nearest-even like torch's `.to`. k and v may be strided views of a fused qkv GEMM output:
only their last dim must be contiguous. Offsets are int64: P * S * KVH * D can pass 2**31.
Slots must lie in [-1, P * S): values are not checked on the host (that would sync, and the
launcher must stay CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastllava.kernels.common import FP_FUSION
from fastllava.kernels.kv_quant import (FP8_KV_DTYPE, check_scales, inv_scale, is_fp8, round_e4m3,
                                        store_kv_ref)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def to_cache(x, inv_scale, cache_ptr, KV_FP8: tl.constexpr):
    """A tile of new K or V rows in the cache's element type (quantized when it is fp8)."""
    if KV_FP8:  # rounded onto the e4m3 grid here, so the cast below is exact
        x = round_e4m3(x.to(tl.float32) * inv_scale)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_inv, v_inv,
                     stride_kn, stride_kh, stride_vn, stride_vh,
                     KVH: tl.constexpr, D: tl.constexpr, KV_FP8: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    # A padding row (slot -1) neither reads its source nor writes.
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < KVH) & (d < D)
        dst = slot * (KVH * D) + h * D + d
        k = tl.load(k_ptr + row * stride_kn + h * stride_kh + d, mask=mask)
        tl.store(k_cache_ptr + dst, to_cache(k, k_inv, k_cache_ptr, KV_FP8), mask=mask)
        v = tl.load(v_ptr + row * stride_vn + h * stride_vh + d, mask=mask)
        tl.store(v_cache_ptr + dst, to_cache(v, v_inv, v_cache_ptr, KV_FP8), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Copy k[n], v[n] (KVH, D) into cache slot slot_mapping[n] (skipped when -1). In place.
    The scales matter only for an fp8 cache."""
    check_write_kv_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    N, KVH, D = k.shape
    if N == 0:
        return
    BLOCK_H, BLOCK_D = triton.next_power_of_2(KVH), triton.next_power_of_2(D)
    # Pure bandwidth: ~8 elements per thread per tensor (16-byte vectors in half precision).
    _write_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping, inv_scale(k_scale), inv_scale(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KVH=KVH, D=D, KV_FP8=is_fp8(k_cache), BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=max(1, min(8, BLOCK_H * BLOCK_D // 256)), enable_fp_fusion=FP_FUSION)


def check_write_kv_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0,
                          v_scale=1.0) -> None:
    if k.dim() != 3:
        raise ValueError(f"k must be (N, KVH, D), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    N, KVH, D = k.shape
    if k_cache.dim() != 4 or k_cache.shape[2:] != (KVH, D):
        raise ValueError(f"k_cache must be (P, S, {KVH}, {D}), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if slot_mapping.shape != (N,):
        raise ValueError(f"slot_mapping must be ({N},), got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (*_FLOAT_DTYPES, FP8_KV_DTYPE):
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float8_e4m3fn, "
                             f"got {t.dtype}")
    check_scales(k_cache, k_scale, v_scale)
    if v.dtype != k.dtype:
        raise ValueError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device}, k on {k.device}: all must share a device")
    if N and (k.stride(2) != 1 or v.stride(2) != 1):
        raise ValueError(f"k and v need a contiguous last dim, got strides {k.stride()}, {v.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (P, S, KVH, D)")
    if slot_mapping.stride(0) != 1 and N > 1:
        raise ValueError(f"slot_mapping must be contiguous, got stride {slot_mapping.stride()}")


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    P, S, KVH, D = k_cache.shape
    k_cache.view(P * S, KVH, D)[slots] = store_kv_ref(k[keep], k_cache.dtype, k_scale)
    v_cache.view(P * S, KVH, D)[slots] = store_kv_ref(v[keep], v_cache.dtype, v_scale)
