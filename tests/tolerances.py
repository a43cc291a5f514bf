"""The one tolerance table for the tests, and the assertions that use it.

- Elementwise kernels keep the reference's rounding points, so they differ from the torch
  reference in the same dtype only where the two evaluate a transcendental (exp, tanh, erf, rsqrt)
  differently: ELEMENTWISE_TOL bounds that, a few ulps of the dtype.
- Attention kernels (fp32 scores, online softmax) are held to FlashAttention's rule: the kernel's
  error against a float64 reference is at most FLASH_FACTOR x the error of the same-dtype torch
  reference against float64, plus a rounding atol of the output dtype.
- Data-movement kernels (KV write) are exact.
"""

from __future__ import annotations

import torch

# Model logits against transformers in fp32: same math, different op order / fusion.
LOGITS_ATOL = 1e-4

ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}
# Elementwise kernels with the reference's rounding points differ bit-wise from it only where a
# transcendental or a reduction order flips a rounding (~0.01-0.03% of elements in fp16); a missing
# rounding point changes 25-40% of them while staying inside ELEMENTWISE_TOL. So the fraction of
# bit-wise mismatches is bounded too, in the half types where rounding is visible.
MAX_BIT_MISMATCH = 0.01
FLASH_FACTOR = 2.0
FLASH_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero()
    first = tuple(idx[0].tolist())
    return (f"{idx.shape[0]} of {bad.numel()} elements differ; first at {first}: "
            f"got {actual[first].item()!r}, expected {expected[first].item()!r}; "
            f"max abs diff {(actual.double() - expected.double()).abs().max().item():.3e}")


def assert_elementwise_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"got {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}")
    tol = ELEMENTWISE_TOL[expected.dtype]
    a, e = actual.double(), expected.double()
    same = (a == e) | (a.isnan() & e.isnan())  # equal infinities and matching NaNs are fine
    bad = ~same & ~((a - e).abs() <= tol["atol"] + tol["rtol"] * e.abs())  # NaN vs number: bad
    assert not bad.any(), describe_mismatch(actual, expected, bad)


def assert_rounding_points_kept(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """At most MAX_BIT_MISMATCH of the elements may differ bit-wise from the reference."""
    frac = (actual != expected).float().mean().item()
    assert frac < MAX_BIT_MISMATCH, (
        f"{frac:.2%} of outputs differ bit-wise from the reference (allowed "
        f"{MAX_BIT_MISMATCH:.0%}): a rounding point is probably missing")


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    bad = actual != expected
    assert not bad.any(), describe_mismatch(actual, expected, bad)


def assert_flash_bound(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp64: torch.Tensor) -> None:
    """out: the kernel; ref_same_dtype: the torch reference in out's dtype; ref_fp64: in float64."""
    assert out.shape == ref_fp64.shape, f"shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert torch.isfinite(out).all(), "the kernel produced non-finite values"
    kernel_err = (out.double() - ref_fp64).abs().max().item()
    torch_err = (ref_same_dtype.double() - ref_fp64).abs().max().item()
    bound = FLASH_FACTOR * torch_err + FLASH_ATOL[out.dtype]
    assert kernel_err <= bound, (
        f"kernel max error {kernel_err:.3e} > {FLASH_FACTOR} x torch {out.dtype} error "
        f"{torch_err:.3e} + {FLASH_ATOL[out.dtype]:.0e}; "
        + describe_mismatch(out.double(), ref_fp64, (out.double() - ref_fp64).abs() > bound))


# FP8 e4m3 (3 mantissa bits): round-to-nearest of a normal value has relative error <= 2^-4;
# subnormals (below 2^-6 in scaled units, spacing 2^-9) have absolute error <= 2^-10 * scale.
FP8_U, FP8_ETA = 2.0 ** -4, 2.0 ** -10


def fp8_linear_error_bound(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                           out_eps: float = 0.0) -> torch.Tensor:
    """Elementwise bound on |fp8_linear(x, Wq, sw) - x @ Wᵀ| (float64; x (N, K), w (M, K) the
    unquantized weight, w_scale (M, 1)). Each operand becomes a + Δa, |Δa| <= u|a| + η·s (s its
    row's scale), so |x̂ŵ - xw| <= Δx|w| + |x|Δw + ΔxΔw summed over K, plus the FP8 GEMM's fp32
    accumulation K·2^-24·Σ|x̂||ŵ| and `out_eps`·|y| for a rounded output. For normal values that
    is ≈ (2u + u²) = 12.9 % of Σ_k |x_k w_k| per output element (relative to the absolute
    products: y itself may cancel to ~0)."""
    xd, wd = x.double(), w.double()
    x_scale = x.abs().amax(dim=-1, keepdim=True).double() / 448.0
    dx = FP8_U * xd.abs() + FP8_ETA * x_scale
    dw = FP8_U * wd.abs() + FP8_ETA * w_scale.double()
    K = x.shape[-1]
    return (dx @ wd.abs().t() + xd.abs() @ dw.t() + dx @ dw.t()
            + K * 2.0 ** -24 * (xd.abs() + dx) @ (wd.abs() + dw).t()
            + out_eps * (xd @ wd.t()).abs())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound elementwise (in float64)."""
    bad = (actual.double() - expected.double()).abs() > bound
    assert not bad.any(), describe_mismatch(actual, expected, bad)
