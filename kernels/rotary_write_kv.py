"""Rotary embedding of q and k fused with the paged KV-cache write: one launch per decoder layer
where there were two (kernels/rotary then kernels/kv_cache_write), plus no per-step cos/sin ops.

    cos, sin = cos_table[positions[n]], sin_table[positions[n]]      (rows of D, model dtype)
    q[n], k[n] = rotary(q[n], k[n], cos, sin)                       in place (kernels/rotary)
    k_cache[slot[n]], v_cache[slot[n]] = k[n], v[n]                 unless slot[n] == -1

The tables hold cos/sin of every position, built once per model (fp32 math, cast to the model
dtype: transformers' rounding points, see layers.RotaryTable); the kernel gathers its row by
position, so nothing about rotary is computed per step. Numerics are kernels/rotary's
(bit-identical to rotary_ref) and kernels/kv_cache_write's (an exact cast to the cache dtype), so
the result matches `rotary_write_kv_ref` bit for bit. k is rotated in place as well as written:
prefill attention reads the step's new keys from k, not from the cache.

Into a float8_e4m3fn cache (kv_cache_dtype "fp8") the rotated k and v are quantized with the
layer's k_scale / v_scale (kernels/kv_quant.py), and their dequantized values are written back
into k and v in place (real rows only): the step's own attention then sees exactly what every
later step will read from the cache, so an fp8 model's output does not depend on how a prompt was
chunked or whether its prefix came from the prefix cache.

Grid (N, q head blocks + KV head blocks), as kernels/rotary: a q program rotates BLOCK_H query
heads of one token; a KV program rotates BLOCK_H key heads, stores them into k and, unless the
token's slot is -1 (CUDA-graph padding, chunk tails), into the cache, then copies the same heads of
v. Shapes: q (N, H, D), k and v (N, KVH, D), strided views of the fused qkv output allowed (last
dim contiguous); positions and slot_mapping (N,) int; tables (L, D); caches (P, S, KVH, D).
Positions must lie in [0, L) and slots in [-1, P * S): not checked on the host (a sync; the
launcher must stay CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastllava.kernels.kv_cache_write import check_write_kv_inputs, write_kv_ref
from fastllava.kernels.kv_quant import (dequantize_kv_ref, inv_scale, is_fp8, quantize_kv_ref,
                                        round_e4m3)
from fastllava.kernels.rotary import _rotate_heads, check_rotary_inputs, rotary_blocks, rotary_ref


@triton.jit
def _store_half(x, x_ptrs, cache_ptrs, mask, inv, scale, KV_FP8: tl.constexpr):
    """x (BLOCK_H, BLOCK_HALF), model dtype, into the cache; for an fp8 cache quantized, and its
    dequantized value written back over x's own rows."""
    if KV_FP8:
        c = round_e4m3(x.to(tl.float32) * inv)        # on the e4m3 grid: the cast is exact
        tl.store(cache_ptrs, c.to(cache_ptrs.dtype.element_ty), mask=mask)
        tl.store(x_ptrs, (c * scale).to(x.dtype), mask=mask)   # = kv_quant.load_kv of it
    else:
        tl.store(cache_ptrs, x.to(cache_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr,
                            k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale, k_inv, v_inv,
                            stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                            stride_cos, stride_sin, H, half,
                            KVH: tl.constexpr, D: tl.constexpr, KV_FP8: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # token; int64 so n * stride cannot overflow
    hb = tl.program_id(1)              # head block: q's blocks first, then KV's
    pos = tl.load(pos_ptr + n).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    c1 = tl.load(cos_ptr + pos * stride_cos + cols, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + half + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_sin + cols, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_sin + half + cols, mask=cmask, other=0.0).to(tl.float32)
    num_q_blocks = tl.cdiv(H, BLOCK_H)
    if hb < num_q_blocks:
        _rotate_heads(q_ptr + n * stride_qn, stride_qh, H, hb * BLOCK_H,
                      c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)
    else:
        head0 = (hb - num_q_blocks) * BLOCK_H
        k1, k2 = _rotate_heads(k_ptr + n * stride_kn, stride_kh, KVH, head0,
                               c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        if slot >= 0:  # a padding row writes nothing and reads no v
            heads = head0 + tl.arange(0, BLOCK_H)
            mask = (heads[:, None] < KVH) & cmask[None, :]
            dst = slot * (KVH * D) + heads[:, None] * D + cols[None, :]  # first half of each head
            kp = k_ptr + n * stride_kn + heads[:, None] * stride_kh + cols[None, :]
            _store_half(k1, kp, k_cache_ptr + dst, mask, k_inv, k_scale, KV_FP8)
            _store_half(k2, kp + half, k_cache_ptr + dst + half, mask, k_inv, k_scale, KV_FP8)
            vp = v_ptr + n * stride_vn + heads[:, None] * stride_vh + cols[None, :]
            _store_half(tl.load(vp, mask=mask), vp, v_cache_ptr + dst, mask, v_inv, v_scale,
                        KV_FP8)
            _store_half(tl.load(vp + half, mask=mask), vp + half, v_cache_ptr + dst + half, mask,
                        v_inv, v_scale, KV_FP8)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_table: torch.Tensor, sin_table: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, k_scale: float = 1.0,
                    v_scale: float = 1.0):
    """Triton version of `rotary_write_kv_ref`: rotates q and k in place, writes k and v into the
    cache at slot_mapping (skipping -1); returns (q, k). For an fp8 cache, quantized with the
    scales, and the real rows of k and v become their dequantized values."""
    check_rotary_inputs(q, k, cos_table, sin_table, rows=None)
    check_write_kv_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    N, H, D = q.shape
    if positions.shape != (N,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be ({N},) int32 or int64, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device}, q on {q.device}")
    if positions.stride(0) != 1 and N > 1:
        raise ValueError(f"positions must be contiguous, got stride {positions.stride()}")
    KVH = k.shape[1]
    if N == 0 or D == 0:
        return q, k
    BLOCK_H, BLOCK_HALF = rotary_blocks(H, KVH, D)
    grid = (N, triton.cdiv(H, BLOCK_H) + triton.cdiv(KVH, BLOCK_H))
    _rotary_write_kv_kernel[grid](
        q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        k_scale, v_scale, inv_scale(k_scale), inv_scale(v_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_table.stride(0), sin_table.stride(0), H, D // 2,
        KVH=KVH, D=D, KV_FP8=is_fp8(k_cache), BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
        num_warps=4,
        # Products rounded separately, like torch's separate mul and add (see kernels/rotary).
        enable_fp_fusion=False)
    return q, k


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        *, k_scale: float = 1.0, v_scale: float = 1.0):
    """The two unfused references in sequence, cos/sin gathered from the tables by position;
    for an fp8 cache, then the written rows of k and v replaced by what the cache holds."""
    rotary_ref(q, k, cos_table[positions], sin_table[positions])
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    if is_fp8(k_cache):
        keep = slot_mapping >= 0
        for x, scale in ((k, k_scale), (v, v_scale)):
            x[keep] = dequantize_kv_ref(quantize_kv_ref(x[keep], scale), scale, x.dtype)
    return q, k
