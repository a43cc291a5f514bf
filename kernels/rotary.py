"""Rotary position embedding, rotate-half (NeoX / Llama) layout, applied to q and k in place.

    inv_freq[i] = 1 / theta^(2i / D)                (fp32)
    cos, sin    = cos/sin(cat(pos * inv_freq, pos * inv_freq))   (fp32, then cast to model dtype)
    x'          = x * cos + rotate_half(x) * sin    (model dtype); rotate_half(x) = cat(-x2, x1)

The cos/sin table is computed once per position in fp32 and cast, matching transformers'
LlamaRotaryEmbedding rounding points. Shapes: q (N, H, D), k (N, KVH, D), cos/sin (N, D).

The Triton kernel splits each head into halves x1 = x[:D/2], x2 = x[D/2:] and keeps the
reference's rounding points: x*cos rounded, rotate_half(x)*sin rounded, their sum rounded, so it
is bit-identical to `rotary_ref` (every product of two dtype values is exact in fp32, and each
sum is formed in fp32 and rounded once, as torch does). The full cos/sin rows are used
(cos[:D/2] for x1, cos[D/2:] for x2), not only their first half. One launch covers q and k:
grid (N, q head blocks + k head blocks); cos/sin are loaded once per program and broadcast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastllava.kernels.common import check_last_dim_contiguous


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, head0, c1, c2, s1, s2, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates heads [head0, head0 + BLOCK_H) of one token in place; x_ptr points at the token.
    Returns the rotated halves (BLOCK_H, BLOCK_HALF) in x's dtype (rotary_write_kv stores them
    into the cache too)."""
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < half)
    p1 = x_ptr + heads[:, None] * stride_h + cols[None, :]  # (BLOCK_H, BLOCK_HALF), first half
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + half, mask=mask, other=0.0)
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # rotate_half(x) = cat(-x2, x1). Products are rounded to the dtype before the add, as in the
    # reference's `q * c + rotate_half(q) * s` (three separate torch ops).
    a1 = (x1f * c1[None, :]).to(dt).to(tl.float32)
    b1 = (-x2f * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2f * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1f * s2[None, :]).to(dt).to(tl.float32)
    o1, o2 = (a1 + b1).to(dt), (a2 + b2).to(dt)
    tl.store(p1, o1, mask=mask)
    tl.store(p1 + half, o2, mask=mask)
    return o1, o2


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr,
                   stride_qn, stride_qh, stride_kn, stride_kh, stride_cn, stride_sn,
                   H, KVH, half,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # token; int64 so n * stride cannot overflow
    hb = tl.program_id(1)              # head block: q's blocks first, then k's
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    c1 = tl.load(cos_ptr + n * stride_cn + cols, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + n * stride_cn + half + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + n * stride_sn + cols, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + n * stride_sn + half + cols, mask=cmask, other=0.0).to(tl.float32)
    num_q_blocks = tl.cdiv(H, BLOCK_H)
    if hb < num_q_blocks:
        _rotate_heads(q_ptr + n * stride_qn, stride_qh, H, hb * BLOCK_H,
                      c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_heads(k_ptr + n * stride_kn, stride_kh, KVH, (hb - num_q_blocks) * BLOCK_H,
                      c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Triton version of `rotary_ref`: rotates q (N, H, D) and k (N, KVH, D) in place, returns them.

    q and k may be strided views (e.g. of a fused qkv output): any token and head strides, last
    dim contiguous; cos/sin (N, D) with any row stride. All in one dtype on one device; D even.
    """
    check_rotary_inputs(q, k, cos, sin, rows=q.shape[0])
    N, H, D = q.shape
    KVH = k.shape[1]
    if N == 0 or D == 0 or H + KVH == 0:
        return q, k
    half = D // 2
    BLOCK_H, BLOCK_HALF = rotary_blocks(H, KVH, D)
    grid = (N, triton.cdiv(H, BLOCK_H) + triton.cdiv(KVH, BLOCK_H))
    _rotary_kernel[grid](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos.stride(0), sin.stride(0), H, KVH, half,
                         BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, num_warps=4,
                         # fp32 q: keep x*c and rot(x)*s as separately rounded products (no FMA),
                         # like torch's separate mul and add kernels.
                         enable_fp_fusion=False)
    return q, k


def check_rotary_inputs(q, k, cos, sin, rows: int | None) -> None:
    """q (N, H, D), k (N, KVH, D) and cos/sin (rows, D) (any rows when None) in one dtype on one
    device, last dims contiguous, D even."""
    check_last_dim_contiguous("q", q, 3)
    check_last_dim_contiguous("k", k, 3)
    check_last_dim_contiguous("cos", cos, 2)
    check_last_dim_contiguous("sin", sin, 2)
    N, H, D = q.shape
    if k.shape[0] != N or k.shape[2] != D:
        raise ValueError(f"k must be ({N}, KVH, {D}) to match q, got {tuple(k.shape)}")
    want = (cos.shape[0] if rows is None else rows, D)
    if cos.shape != want or sin.shape != want:
        raise ValueError(f"cos and sin must be ({'L' if rows is None else rows}, {D}), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if D % 2:
        raise ValueError(f"head dim D must be even for rotate-half, got {D}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on "
                             f"{t.device}")


def rotary_blocks(H: int, KVH: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_HALF): about 2K elements per half per program, big enough to amortise the
    cos/sin loads, small enough that a decode step (N = 1) still spreads 64 heads of D = 128 over
    several SMs."""
    BLOCK_HALF = triton.next_power_of_2(max(D // 2, 8))
    return min(triton.next_power_of_2(max(H, KVH)), max(1, 2048 // BLOCK_HALF)), BLOCK_HALF


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # Same expression as transformers (int64 arange → float, then pow) so inv_freq is bit-identical.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (N, D) in `dtype` for integer positions (N,)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                          # (N, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k in place; returns them."""
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    q.copy_(q * c + _rotate_half(q) * s)
    k.copy_(k * c + _rotate_half(k) * s)
    return q, k
