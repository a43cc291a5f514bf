"""`stable_sort_rows_` (the CPU sampler's sort) against torch's stable sort: the same ids always,
the same values up to the canonical forms it documents (-0.0 as +0.0, one NaN)."""

from __future__ import annotations

import pytest
import torch

from fastllava.runtime.row_sort import stable_sort_rows_, stable_sort_rows_ref

SPECIAL = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                        1e-45, -1e-45, 1.17e-38, -1.17e-38, 1.0, -1.0, 2.0, -2.0, 3.4e38, -3.4e38])


def _inputs(B: int, V: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(B, V, generator=g) / 0.7
    if kind == "ties":         # few distinct values: every row is mostly ties
        return torch.randint(-3, 4, (B, V), generator=g).float() * 0.5
    if kind == "special":      # signed zeros, NaNs of both signs, infinities, subnormals
        return SPECIAL[torch.randint(0, len(SPECIAL), (B, V), generator=g)]
    if kind == "constant":
        return torch.full((B, V), -7.25)
    # NaN payloads other than the default one, and a NaN with the sign bit set
    bits = torch.randint(0x7F80_0001, 0x7FFF_FFFF, (B, V), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32).clone()
    x[:, ::3] = -x[:, ::3]
    x[:, 1::5] = torch.randn(B, len(range(1, V, 5)), generator=g)
    return x


def _check(x: torch.Tensor) -> None:
    want_values, want_ids = stable_sort_rows_ref(x)
    values, ids = stable_sort_rows_(x.clone())
    assert ids.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(ids, want_ids), "ids differ from torch.sort(stable=True)"
    # -0.0 comes back as +0.0 (== compares them equal) and NaNs as one NaN (equal_nan)
    assert torch.allclose(values, want_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(values), torch.isnan(want_values))


@pytest.mark.parametrize("kind", ["normal", "ties", "special", "constant", "nan_payloads"])
@pytest.mark.parametrize("B,V", [(1, 1), (1, 2), (3, 17), (8, 255), (65, 1000), (2, 32000)])
def test_same_order_as_torch_stable_sort(kind, B, V):
    _check(_inputs(B, V, kind, seed=B * 1000 + V))


def test_real_vocab_batch():
    _check(_inputs(64, 64000, "normal", seed=1))
    _check(_inputs(4, 152064, "ties", seed=2))


def test_cpu_path_sorts_in_place_and_other_inputs_fall_back():
    x = _inputs(4, 100, "normal", seed=3)
    y = x.clone()
    values, _ = stable_sort_rows_(y)
    assert values.data_ptr() == y.data_ptr()     # the values live in the input's memory
    strided = _inputs(4, 200, "ties", seed=4)[:, ::2]    # not contiguous: torch.sort, x untouched
    before = strided.clone()
    values, ids = stable_sort_rows_(strided)
    assert torch.equal(strided, before) and values.data_ptr() != strided.data_ptr()
    assert torch.equal(ids, stable_sort_rows_ref(before)[1])
    half = x.half()                                      # not fp32: torch.sort
    assert torch.equal(stable_sort_rows_(half)[1], torch.sort(half, dim=-1, stable=True)[1])
