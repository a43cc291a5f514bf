"""The Triton SiLU-and-mul against `silu_and_mul_ref`.

Same rounding points as the reference (silu rounded to the dtype, then the product rounded), so
only exp's implementation differs: ELEMENTWISE_TOL.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from tolerances import assert_elementwise_close, assert_exact, assert_rounding_points_kept
from kernel_device import DEVICE

# exp(-x) overflowing to inf for very negative x is intended (x / inf = -0); the interpreter's
# numpy reports it as a RuntimeWarning, compiled kernels do not.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,I", [(1, 40), (7, 1000), (113, 40), (3, 5120), (2, 1)])
def test_matches_ref(dtype, N, I):
    gen = torch.Generator().manual_seed(N * 10_000 + I)
    x = (torch.randn(N, 2 * I, generator=gen) * 3).to(dtype).to(DEVICE)
    out = silu_and_mul(x)
    assert out.is_contiguous()
    assert_elementwise_close(out, silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_large_gates(dtype):
    """x is a column slice of a wider buffer; gates span +-90 (exp(-g) overflows to inf for the
    most negative: silu must give -0, not NaN) and the buffer is left untouched."""
    gen = torch.Generator().manual_seed(5)
    N, I = 113, 300
    buf = (torch.randn(N, 2 * I + 11, generator=gen) * 2).to(dtype).to(DEVICE)
    gate = torch.linspace(-90, 90, N * I).reshape(N, I)
    buf[:, 3:3 + I] = gate.to(dtype).to(DEVICE)
    before = buf.clone()
    x = buf[:, 3:3 + 2 * I]
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
    assert_elementwise_close(out, ref)
    assert_exact(buf, before)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_rounding_points(dtype):
    """silu(gate) rounded to the dtype before the multiply: the kernel then differs bit-wise from
    the reference only where exp flips a rounding (~0.03%); computing silu * up in fp32 and
    rounding once would change about a quarter of the outputs, inside ELEMENTWISE_TOL."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(113, 2000, generator=gen) * 3).to(dtype).to(DEVICE)
    out, ref = silu_and_mul(x), silu_and_mul_ref(x)
    assert_rounding_points_kept(out, ref)


def test_bad_inputs_raise():
    cases = [
        (torch.randn(8, device=DEVICE), "2-D"),
        (torch.randn(3, 7, device=DEVICE), "even"),
        (torch.randn(8, 3, device=DEVICE).t(), "contiguous in its last dim"),
        (torch.ones(3, 8, dtype=torch.int32, device=DEVICE), "floating"),
    ]
    for x, match in cases:
        with pytest.raises(ValueError, match=match):
            silu_and_mul(x)
