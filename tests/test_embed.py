"""`LlavaModel.embed`: image features go, in order, into the flagged positions, with no host sync.

The plain form is `embeds[mask] = features` (a boolean index: nonzero(), which waits for the
device); embed uses masked_scatter instead. Same values; on CUDA the sync debug mode proves the
step no longer waits."""

from __future__ import annotations

import pytest
import torch

from fastllava.loading import load_checkpoint


def _model(path, device: str):
    return load_checkpoint(str(path), device=torch.device(device), dtype=torch.float32).model


def _inputs(model, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 40
    mask = torch.rand(n, generator=g) < 0.4
    mask[:3] = torch.tensor([True, False, True])          # runs of one, with gaps
    ids = torch.randint(0, 100, (n,), generator=g)
    ids[mask] = -200                                       # an original checkpoint's sentinel
    hidden = model.language_model.embed_tokens.weight.shape[1]
    feats = torch.randn(int(mask.sum()), hidden, generator=g)
    return ids.to(device), mask.to(device), feats.to(device)


def test_features_land_in_order_where_flagged(tiny_llava):
    model = _model(tiny_llava, "cpu")
    for seed in range(3):
        ids, mask, feats = _inputs(model, "cpu", seed)
        want = model.language_model.embed_tokens(ids.masked_fill(mask, 0))
        want[mask] = feats
        got = model.embed(ids, mask, feats)
        assert torch.equal(got, want)
        assert torch.equal(model.embed(ids.clamp(min=0), None, None),
                           model.language_model.embed_tokens(ids.clamp(min=0)))
    with pytest.raises(ValueError, match="without image_features"):
        model.embed(ids, mask, None)


@pytest.mark.gpu
def test_embed_does_not_sync_on_cuda(tiny_llava):
    model = _model(tiny_llava, "cuda")
    ids, mask, feats = _inputs(model, "cuda", 0)
    want = model.language_model.embed_tokens(ids.masked_fill(mask, 0))
    want[mask] = feats
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = model.embed(ids, mask, feats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
