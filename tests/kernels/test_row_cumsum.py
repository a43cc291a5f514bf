"""The per-row Triton scan (the sampler's top-p cumsum on CUDA) against torch.cumsum, and its
reason to exist: a row's sums are the same bits alone or in any batch."""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.row_cumsum import BLOCK, row_cumsum, row_cumsum_ref
from kernel_device import DEVICE


def probs(B: int, V: int, seed: int, device=DEVICE) -> torch.Tensor:
    """Sorted-ascending softmax rows, as top-p scans them (sharp: a few tokens hold the mass)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=gen) * 4).softmax(-1).sort(-1).values.to(device)


@pytest.mark.parametrize("B,V", [(1, 1), (3, 7), (2, BLOCK), (2, BLOCK + 1), (5, 3 * BLOCK - 5),
                                 (1, 32064)])
def test_matches_cumsum(B, V):
    x = probs(B, V, B * V)
    out = row_cumsum(x)
    exact = x.double().cumsum(-1)
    # fp32 partial sums of values in [0, 1] summing to 1: a few ulps of 1 at most.
    assert (out.double() - exact).abs().max().item() <= 8 * 2**-24 * max(1, V / BLOCK)
    assert torch.allclose(out, row_cumsum_ref(x), rtol=0, atol=1e-6)
    assert out[:, -1].sub(1).abs().max().item() < 1e-5       # each row sums to 1


def test_rows_are_batch_invariant():
    """Row i's sums are bit-identical alone, in its batch, and in a larger reordered batch."""
    x = probs(9, 2 * BLOCK + 77, 1)
    batch = row_cumsum(x)
    shuffled = row_cumsum(torch.cat([x.flip(0), probs(20, x.shape[1], 2)]))
    for i in range(x.shape[0]):
        alone = row_cumsum(x[i:i + 1].clone())
        assert torch.equal(alone[0], batch[i]) and torch.equal(alone[0], shuffled[8 - i])


def test_out_and_strided_rows():
    buf = probs(4, 600, 3)
    x = buf[:, 50:550]                  # row stride 600, contiguous last dim
    out = torch.full((4, 500), float("nan"), device=DEVICE)
    assert row_cumsum(x, out=out) is out
    assert torch.equal(out, row_cumsum(x.contiguous()))


def test_bad_inputs_raise():
    x = probs(2, 10, 4)
    with pytest.raises(ValueError, match="float32"):
        row_cumsum(x.double())
    with pytest.raises(ValueError, match="float32"):
        row_cumsum(x[0])
    with pytest.raises(ValueError, match="contiguous"):
        row_cumsum(x.t())
    with pytest.raises(ValueError, match="out must be"):
        row_cumsum(x, out=torch.empty(2, 11, device=DEVICE))


@pytest.mark.gpu
def test_gpu_batch_invariant_at_the_sampler_shape():
    """256 rows of a 64k vocabulary (where torch.cumsum's block scan narrows) against one row."""
    x = probs(256, 64064, 5, "cuda")
    batch = row_cumsum(x)
    for i in (0, 77, 255):
        assert torch.equal(row_cumsum(x[i:i + 1].clone())[0], batch[i])
    assert (batch.double() - x.double().cumsum(-1)).abs().max().item() < 1e-5
