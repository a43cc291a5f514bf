"""The Triton RMSNorm (+ fused residual add) against `rms_norm_ref`.

Same rounding points as the reference, so residual_out is bit-identical (a plain rounded add) and
out differs only through rsqrt and the order of the fp32 sum of squares (ELEMENTWISE_TOL).
On CPU the kernel runs under the Triton interpreter; with CUDA it is compiled and runs there.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.rms_norm import MAX_HIDDEN, rms_norm, rms_norm_ref
from tolerances import assert_elementwise_close, assert_exact, assert_rounding_points_kept
from kernel_device import DEVICE

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def rand(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 40), (7, 1000), (113, 40), (7, 5120), (3, 8192)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_ref(dtype, N, H, with_residual):
    gen = torch.Generator().manual_seed(N * 10_000 + H)
    x = rand(gen, N, H, dtype=dtype, scale=3.0)
    res = rand(gen, N, H, dtype=dtype, scale=3.0) if with_residual else None
    w = rand(gen, H, dtype=dtype) + 1.0
    out, res_out = rms_norm(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert_elementwise_close(out, ref)
    assert_exact(res_out, ref_res)
    if not with_residual:
        assert res_out is x, "with no residual, residual_out is x itself (as in the reference)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    """x and residual are column slices of wider buffers (row stride != H); inputs untouched."""
    gen = torch.Generator().manual_seed(1)
    N, H = 113, 1000
    xbuf = rand(gen, N, H + 37, dtype=dtype)
    rbuf = rand(gen, N, 2 * H, dtype=dtype)
    x, res = xbuf[:, 5:5 + H], rbuf[:, H:]
    x_before, r_before = xbuf.clone(), rbuf.clone()
    w = rand(gen, H, dtype=dtype)
    out, res_out = rms_norm(x, w, 1e-6, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
    assert_elementwise_close(out, ref)
    assert_exact(res_out, ref_res)
    assert out.is_contiguous() and res_out.is_contiguous()
    assert_exact(xbuf, x_before)
    assert_exact(rbuf, r_before)


def test_large_and_tiny_rows():
    """Rows of very different scale (fp16 sums near overflow, tiny values near eps)."""
    gen = torch.Generator().manual_seed(2)
    N, H = 7, 1000
    scale = torch.tensor([1e-3, 1e-1, 1.0, 30.0, 100.0, 200.0, 1.0])[:, None]
    x = (torch.randn(N, H, generator=gen) * scale).half().to(DEVICE)
    res = (torch.randn(N, H, generator=gen) * scale).half().to(DEVICE)
    w = rand(gen, H, dtype=torch.float16)
    out, res_out = rms_norm(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert torch.isfinite(out).all(), "fp16 rows with large values must not overflow (fp32 sum)"
    assert_elementwise_close(out, ref)
    assert_exact(res_out, ref_res)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_rounding_points(dtype):
    """With the reference's rounding points the kernel is bit-identical to it except where rsqrt
    or the sum order flip a rounding (~0.01% of elements); skipping the rounding of the normalised
    value before the weight multiply would change about a quarter of them, yet stay inside
    ELEMENTWISE_TOL. So count exact mismatches, in the half types where rounding is visible."""
    gen = torch.Generator().manual_seed(7)
    x = rand(gen, 113, 1000, dtype=dtype, scale=3.0)
    res = rand(gen, 113, 1000, dtype=dtype, scale=3.0)
    w = rand(gen, 1000, dtype=dtype)
    out, _ = rms_norm(x, w, 1e-5, res)
    ref, _ = rms_norm_ref(x, w, 1e-5, res)
    assert_rounding_points_kept(out, ref)


def test_bad_inputs_raise():
    x = torch.randn(3, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    cases = [
        (dict(x=x[0], weight=w), "x must be 2-D"),
        (dict(x=x, weight=torch.ones(15, device=DEVICE)), "weight must be"),
        (dict(x=x, weight=w.half()), "weight must be"),
        (dict(x=x, weight=w, residual=x[:2]), "residual must be"),
        (dict(x=x, weight=w, residual=x.half()), "residual must be"),
        (dict(x=torch.randn(16, 3, device=DEVICE).t(), weight=w), "contiguous in its last dim"),
        (dict(x=x, weight=w, residual=torch.randn(16, 3, device=DEVICE).t()),
         "contiguous in its last dim"),
        (dict(x=x.to(torch.int32), weight=w.to(torch.int32)), "floating"),
        (dict(x=torch.zeros(1, MAX_HIDDEN + 1, device=DEVICE),
              weight=torch.zeros(MAX_HIDDEN + 1, device=DEVICE)), "MAX_HIDDEN"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            rms_norm(eps=1e-5, **kwargs)
