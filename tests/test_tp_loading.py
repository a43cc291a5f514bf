"""Tensor-parallel loading: each rank reads only its slices of the sharded tensors (through
safetensors' get_slice, cut from the memory map) — half of their bytes at TP=2, never a whole
one — and the slices are the right ones (the ranks' shards put together are the TP=1 model).
Loading needs no process group, so both ranks load in this process."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastllava.loading import load_checkpoint
from fastllava.models.parallel import TensorParallel
from fastllava.weights import loader
from fastllava.weights.sharding import tensor_shards

WORLD = 2


class _CountingFile:
    """safe_open, counting the bytes handed out per key: whole tensors and slices apart."""

    def __init__(self, real, whole: Counter, sliced: Counter):
        self.real, self.whole, self.sliced = real, whole, sliced

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        self.whole[key] += t.nbytes
        return t

    def get_slice(self, key):
        view, sliced = self.f.get_slice(key), self.sliced

        class _View:
            def __getitem__(self, index):
                t = view[index]
                sliced[key] += t.nbytes
                return t
        return _View()


def _load(path, monkeypatch, tp):
    whole, sliced = Counter(), Counter()
    real = loader.safe_open
    monkeypatch.setattr(loader, "safe_open",
                        lambda *a, **k: _CountingFile(real(*a, **k), whole, sliced))
    ckpt = load_checkpoint(str(path), device=torch.device("cpu"), dtype=torch.float32, tp=tp)
    monkeypatch.setattr(loader, "safe_open", real)
    return ckpt.model, whole, sliced


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava"])
def test_each_rank_reads_only_its_slices(request, monkeypatch, fixture):
    path = request.getfixturevalue(fixture)
    full, whole1, _ = _load(path, monkeypatch, None)
    ranks = [_load(path, monkeypatch, TensorParallel(r, WORLD)) for r in range(WORLD)]

    sharded_params = set(tensor_shards(ranks[0][0]))
    # 2 layers x (qkv, o, gate_up, down) + embedding + lm_head
    assert len(sharded_params) == 2 * 4 + 2, sorted(sharded_params)
    sharded_keys = set(ranks[0][2])
    assert sharded_keys, "nothing was read through get_slice"
    for model, whole, sliced in ranks:
        assert not sharded_keys & set(whole), "a rank read a whole sharded tensor"
        for key in sharded_keys:
            assert sliced[key] * WORLD == whole1[key], \
                f"{key}: read {sliced[key]} bytes of {whole1[key]}"
        # what is not sharded (vision tower, projector, norms) is read whole, as at TP=1
        assert set(whole) == set(whole1) - sharded_keys
    total_sharded = sum(whole1[k] for k in sharded_keys)
    assert total_sharded > 0.5 * sum(whole1.values())  # the decoder dominates even the tiny model

    # The slices are the right ones: put back together, the TP=1 parameters.
    full_params = dict(full.named_parameters())
    shards = [dict(m.named_parameters()) for m, _, _ in ranks]
    for name in sharded_params:
        spec = tensor_shards(ranks[0][0])[name]
        parts = [torch.split(s[name], spec.local_sizes(), dim=spec.dim) for s in shards]
        joined = torch.cat([torch.cat([p[j] for p in parts], dim=spec.dim)
                            for j in range(len(spec.full_sizes))], dim=spec.dim)
        assert torch.equal(joined, full_params[name]), name


def test_uneven_vocab_slices():
    """A vocab that does not divide: ceil-sized slices, the last rank holds the rest."""
    from fastllava.weights.sharding import TensorShard

    spans = [TensorShard(0, r, 3, (10,)).bounds(10) for r in range(3)]
    assert spans == [(0, 4), (4, 8), (8, 10)]
    pre_fused = TensorShard(0, 1, 2, (8, 4, 4)).pieces(None)
    assert pre_fused == ((4, 8), (10, 12), (14, 16))
