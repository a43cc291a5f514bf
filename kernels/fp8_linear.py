"""FP8 (e4m3) linear layer: per-output-channel weight scales, per-token dynamic activation scales.

    W ≈ sw ⊙ Wq     Wq (M, K) float8_e4m3fn, sw (M, 1) fp32 = amax(|W[m, :]|) / 448
    x ≈ sx ⊙ xq     xq (N, K) float8_e4m3fn, sx (N, 1) fp32 = amax(|x[n, :]|) / 448, per call
    y = (xq @ Wqᵀ) ⊙ sx ⊙ swᵀ                  (N, M), accumulated in fp32

448 is e4m3fn's largest finite value, so each row's largest element maps to ±448 and nothing
saturates. e4m3 keeps 3 mantissa bits: a normal value is rounded with relative error ≤ 2^-4;
values under 2^-6 (in scaled units) are subnormal, rounded with absolute error ≤ 2^-10 · scale.
Per-channel / per-token scales make every row independent, so fused projections (q/k/v,
gate/up) quantize exactly as their parts would, and a padding row cannot perturb a real one.

The GEMM is `torch._scaled_mm` with row-wise scales (scale_a (N, 1), scale_b (1, M)). It runs
on CPU in torch 2.13 for every output dtype (fp32 included), which is what the CPU tests use.
On CUDA (sm89+) row-wise scaling is guaranteed for bf16 output only (fp16/fp32 output depend on
the torch/cuBLAS version), so there the GEMM writes bf16 and a non-bf16 model casts after it.
`fp8_linear_ref` is the same math in plain torch: dequantize both operands to fp32, matmul.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max   # 448.0
# An all-zero row (a zero weight channel, a zero padding token) would get scale 0 and 0/0 = NaN:
# its amax is floored, which quantizes the row to exact zeros.
_MIN_AMAX = 1e-12


def quantize_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, C) floating → (q (R, C) float8_e4m3fn, scale (R, 1) fp32) with t ≈ q * scale.
    The division is done in fp32 whatever t's dtype (type promotion by the fp32 scale: no fp32
    copy of t first); the clamp only guards rounding of the row maximum (amax / (amax / 448)
    may land a hair above 448)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(_MIN_AMAX)
    scale = amax / FP8_MAX
    q = (t / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32/fp16/bf16; weight (M, K) float8_e4m3fn; weight_scale (M, 1) fp32
    → (..., M) in x's dtype, no bias."""
    if weight.dtype != FP8_DTYPE or weight_scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear needs a {FP8_DTYPE} weight and fp32 scales, got "
                         f"{weight.dtype} and {weight_scale.dtype}")
    M, K = weight.shape
    if x.shape[-1] != K or tuple(weight_scale.shape) != (M, 1):
        raise ValueError(f"fp8_linear shapes: x {tuple(x.shape)}, weight {(M, K)}, "
                         f"weight_scale {tuple(weight_scale.shape)} (expected (..., {K}), "
                         f"({M}, 1))")
    lead = x.shape[:-1]
    xq, x_scale = quantize_fp8_rows(x.reshape(-1, K))
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    # weight.t() is the column-major (K, M) operand _scaled_mm wants; scale_b is (1, M).
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                         out_dtype=out_dtype)
    return y.to(x.dtype).reshape(*lead, M)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
                   ) -> torch.Tensor:
    """`fp8_linear` in plain torch: the activations fake-quantized identically, both operands
    dequantized to fp32, one fp32 matmul, the result rounded to x's dtype."""
    K = weight.shape[1]
    xq, x_scale = quantize_fp8_rows(x.reshape(-1, K))
    w = weight.float() * weight_scale                       # (M, K) fp32
    y = (xq.float() * x_scale) @ w.t()                      # (N, M) fp32
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
