"""raw_logprobs: the fp32 log-softmax of the logits, top-k in descending order with ties to the
lowest id, the same for k = 1 (argmax path) as for larger k."""

from __future__ import annotations

import pytest
import torch

from fastllava.runtime.sampler import raw_logprobs


def test_values_order_and_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4
    logits[1, [7, 3, 40]] = 20.0                       # a three-way tie for the top
    chosen_ids = torch.tensor([0, 40, 49])
    ref = torch.log_softmax(logits.double(), dim=-1)
    chosen, values, ids = raw_logprobs(logits, chosen_ids, 5)
    assert torch.allclose(chosen.double(), ref.gather(-1, chosen_ids[:, None]).squeeze(-1),
                          atol=1e-6, rtol=0)
    assert ids[1, :3].tolist() == [3, 7, 40]           # ties: lowest id first
    for row in range(3):
        want = sorted(range(50), key=lambda v: (-ref[row, v].item(), v))[:5]
        assert ids[row].tolist() == want
        assert torch.allclose(values[row].double(), ref[row, want], atol=1e-6, rtol=0)
    _, v1, i1 = raw_logprobs(logits, chosen_ids, 1)
    assert i1[:, 0].tolist() == ids[:, 0].tolist() and torch.equal(v1[:, 0], values[:, 0])
    _, v0, i0 = raw_logprobs(logits, chosen_ids, 0)
    assert v0.shape == (3, 0) and i0.dtype == torch.int64


def test_refuses_non_fp32():
    with pytest.raises(ValueError, match="float32"):
        raw_logprobs(torch.zeros(2, 4, dtype=torch.float16), torch.zeros(2, dtype=torch.int64), 1)
