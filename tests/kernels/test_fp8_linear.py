"""The FP8 linear (`torch._scaled_mm`, row-wise scales) against `fp8_linear_ref` and against the
unquantized product, with error bounds derived from e4m3's format.

The bound. e4m3fn keeps 3 mantissa bits, so round-to-nearest of a normal value a has relative
error ≤ u = 2^-4; below 2^-6 (scaled units) values are subnormal with spacing 2^-9, absolute error
≤ η·s, η = 2^-10, s the row's scale. So each quantized operand is a + Δa with
|Δa| ≤ u|a| + η·s, and for y = Σ_k x_k w_k:

    |ŷ - y| ≤ Σ_k (Δx_k |w_k| + |x_k| Δw_k + Δx_k Δw_k) + K·2^-24 Σ_k |x̂_k| |ŵ_k|

(the last term: the fp32 accumulation of the FP8 GEMM; y itself is taken in float64): see
tolerances.fp8_linear_error_bound. For normal values this is ≈ (2u + u²) = 12.9 % of
Σ|x_k w_k| per output element: a bound relative to the absolute products, since y can cancel
to ~0. Against the reference (same quantized operands) only accumulation order and the output
rounding remain.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.fp8_linear import (FP8_DTYPE, FP8_MAX, fp8_linear, fp8_linear_ref,
                                          quantize_fp8_rows)
from kernel_device import DEVICE
from tolerances import FP8_ETA, FP8_U, assert_within, fp8_linear_error_bound

EPS32 = 2.0 ** -24
# cuBLAS / CUTLASS FP8 GEMMs need K and M multiples of 16: odd shapes are CPU-only.
SHAPES = [(1, 64, 48), (5, 128, 96), (33, 64, 256)]
ODD = [pytest.param(*s, marks=pytest.mark.skipif(DEVICE == "cuda", reason="K, M % 16 on CUDA"))
       for s in [(7, 13, 5), (2, 1, 3)]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _operands(N, K, M, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen) * 4  # rows vary
    w = torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 0.2
    wq, ws = quantize_fp8_rows(w.to(DEVICE))
    return x.to(dtype).to(DEVICE), w.to(DEVICE), wq, ws


def test_quantize_rows_scales_maps_amax_to_448_and_zero_rows_to_zero():
    t = torch.tensor([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0], [2.0 ** -20, 7.0, -7.0]], device=DEVICE)
    q, s = quantize_fp8_rows(t)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (3, 1)
    torch.testing.assert_close(s[[0, 2]], torch.tensor([[3.0], [7.0]], device=DEVICE) / FP8_MAX)
    assert q.float().abs().amax(dim=1)[[0, 2]].tolist() == [FP8_MAX, FP8_MAX]
    assert torch.isfinite(s).all() and (q[1].float() == 0).all()


def test_quantize_rows_error_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(64, 300, generator=gen) * torch.logspace(-3, 3, 64)[:, None]).to(DEVICE)
    q, s = quantize_fp8_rows(t)
    err = (q.double() * s.double() - t.double()).abs()
    bound = FP8_U * t.double().abs() + FP8_ETA * s.double()
    assert_within(q.double() * s.double(), t.double(), bound)
    assert err.max() > 0  # it does round


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,M", SHAPES + ODD)
def test_matches_dequantized_reference(dtype, N, K, M):
    """Same quantized operands: only the accumulation order and the output rounding differ
    (on CUDA the GEMM writes bf16 for every model dtype, see kernels/fp8_linear.py)."""
    x, _, wq, ws = _operands(N, K, M, dtype, seed=N * 1000 + K + M)
    out, ref = fp8_linear(x, wq, ws), fp8_linear_ref(x, wq, ws)
    assert out.dtype == dtype and out.shape == (N, M)
    xq, xs = quantize_fp8_rows(x)
    absolute = (xq.double() * xs).abs() @ (wq.double() * ws).abs().t()
    gemm_dtype = torch.bfloat16 if DEVICE == "cuda" else dtype
    rounding = sum(torch.finfo(d).eps for d in {gemm_dtype, dtype}) * ref.double().abs()
    assert_within(out, ref, 2 * K * EPS32 * absolute + rounding)


def test_leading_dims_and_a_padding_row():
    """(B, T, K) input; an all-zero token row gives zeros and leaves the other rows as they are
    with that row nonzero (the same shapes: a CPU GEMM may pick its kernel by row count, e.g.
    oneDNN on AMD Zen 5, so a call with fewer rows need not give the same bits)."""
    x, _, wq, ws = _operands(6, 64, 32, torch.float32, seed=3)
    full = fp8_linear(x.reshape(2, 3, 64), wq, ws).reshape(6, 32)
    x[2] = 0
    out = fp8_linear(x.reshape(2, 3, 64), wq, ws)
    assert out.shape == (2, 3, 32) and (out[0, 2] == 0).all() and (full[2] != 0).any()
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out.reshape(6, 32)[keep], full[keep], rtol=0, atol=0)


@pytest.mark.parametrize("N,K,M", SHAPES + ODD)
def test_error_against_unquantized_within_derived_bound(N, K, M):
    x, w, wq, ws = _operands(N, K, M, torch.float32, seed=7 * N + K)
    out = fp8_linear(x, wq, ws)
    out_eps = torch.finfo(torch.bfloat16).eps if DEVICE == "cuda" else 0.0  # bf16 GEMM output
    assert_within(out, x.double() @ w.double().t(), fp8_linear_error_bound(x, w, ws, out_eps))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,M", [(1, 7168, 15360), (37, 5120, 5120), (300, 4096, 22016)])
def test_real_shapes_bf16_on_gpu(N, K, M):
    """cuBLAS/CUTLASS row-wise FP8 at LLaVA shapes (34B qkv, 13B o, 7B gate_up), bf16 model."""
    x, w, wq, ws = _operands(N, K, M, torch.bfloat16, seed=N + K + M)
    out = fp8_linear(x, wq, ws)
    assert out.dtype == torch.bfloat16
    bf16 = torch.finfo(torch.bfloat16).eps
    assert_within(out, x.double() @ w.double().t(), fp8_linear_error_bound(x, w, ws, bf16))
    ref = fp8_linear_ref(x, wq, ws)
    xq, xs = quantize_fp8_rows(x)
    absolute = (xq.double() * xs).abs() @ (wq.double() * ws).abs().t()
    assert_within(out, ref, 2 * K * EPS32 * absolute + 2 * bf16 * ref.double().abs())


def test_rejects_unquantized_weights_and_bad_scale_shapes():
    x, w, wq, ws = _operands(2, 16, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        fp8_linear(x, w, ws)
    with pytest.raises(ValueError, match=r"weight_scale \(16,\)"):
        fp8_linear(x, wq, ws.reshape(-1))
    with pytest.raises(ValueError, match=r"x \(2, 8\)"):
        fp8_linear(x[:, :8], wq, ws)
