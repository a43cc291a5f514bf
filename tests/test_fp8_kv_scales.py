"""Calibrated FP8 KV-cache scales from a compressed-tensors checkpoint (`kv_cache_scheme` plus
`self_attn.k_scale` / `v_scale` per decoder layer, weights/kv_scales.py): they become the fp8
cache's per-layer scales with the checkpoint's meaning (dequantized K = fp8 * k_scale), exactly
as if set by hand; kv_cache_dtype "auto" leaves them unused; a broken scale is a CheckpointError
naming the tensor and an unsupported kv_cache_scheme a ConfigError naming the field."""

from __future__ import annotations

import json

import pytest
import torch
# requests_ and rescaled are test_fp8_accuracy's fixtures (the non-degenerate tiny checkpoint)
from test_fp8_accuracy import _generate, requests_, rescaled  # noqa: F401
from test_fp8_kv_accuracy import load, patch_op

import fp8_checkpoint as ck
from fastllava.config import ConfigError
from fastllava.kernels.kv_quant import to_fp32
from fastllava.weights import CheckpointError, WeightLoadError, kv_scales, loader

FP8 = torch.float8_e4m3fn
L0, L1 = "language_model.model.layers.0.self_attn.", "language_model.model.layers.1.self_attn."


def _num_layers(path) -> int:
    return json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]


@pytest.fixture(scope="module")
def scales(rescaled):
    """Per-layer scales far from 1 and from powers of two (so e4m3 rounds differently than at
    scale 1), fp32 numbers; |K|, |V| / scale stays inside ±448 (the tiny model's reach ≈ 3.8)."""
    n = _num_layers(rescaled)
    return ([to_fp32(0.0113 * (i + 1)) for i in range(n)],
            [to_fp32(0.0071 * (i + 2)) for i in range(n)])


@pytest.fixture(scope="module")
def checkpoints(rescaled, scales, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kvscales")
    return (ck.fp8_dynamic(rescaled, folder / "plain"),
            ck.fp8_dynamic(rescaled, folder / "scaled", kv_scales=scales))


def test_checkpoint_scales_are_the_caches_and_mean_fp8_times_scale(checkpoints, scales,
                                                                    requests_):
    _, scaled = checkpoints
    llava = load(scaled, "fp8")
    try:
        kv = llava.engine.runner.kv
        assert kv.k[0].dtype == FP8
        assert (kv.k_scale, kv.v_scale) == (scales[0], scales[1])
        # What the cache holds: written K / k_scale, read back as fp8 * k_scale (the checkpoint's
        # convention). rotary_write_kv hands back the read-back values in k and v.
        written = []

        def record(real, q, k, v, positions, cos, sin, k_cache, v_cache, slots, **kw):
            out = real(q, k, v, positions, cos, sin, k_cache, v_cache, slots, **kw)
            written.append((k.clone(), v.clone(), k_cache.flatten(0, 1)[slots].clone(),
                            v_cache.flatten(0, 1)[slots].clone(), kw))
            return out
        patch_op(llava, "rotary_write_kv", record)
        llava.generate(requests_[0])
        L = len(scales[0])
        for n, (k, v, ck_, cv, kw) in enumerate(written):
            assert (kw["k_scale"], kw["v_scale"]) == (scales[0][n % L], scales[1][n % L])
            assert torch.equal(ck_.float() * kw["k_scale"], k.float())
            assert torch.equal(cv.float() * kw["v_scale"], v.float())
        # x / scale, not x * scale: the stored codes use e4m3's range (|x| ≤ 3.8 at scale 1)
        assert max(c.float().abs().max().item() for _, _, c, _, _ in written) > 64
    finally:
        llava.close()


def test_outputs_equal_scales_set_by_hand(checkpoints, scales, requests_):
    """The checkpoint's scales give the logits of the same weights with the scales set on the
    cache by hand, bit for bit; scale 1.0 gives other logits (the scales are really used)."""
    plain, scaled = checkpoints
    from_ckpt, by_hand, ones = load(scaled, "fp8"), load(plain, "fp8"), load(plain, "fp8")
    try:
        kv = by_hand.engine.runner.kv
        kv.k_scale[:], kv.v_scale[:] = scales
        for request in requests_[:3]:
            ids, logits = _generate(from_ckpt, request)
            ids_hand, logits_hand = _generate(by_hand, request)
            assert ids == ids_hand and torch.equal(logits, logits_hand)
            assert not torch.equal(_generate(ones, request)[1][:1], logits[:1])
    finally:
        for llava in (from_ckpt, by_hand, ones):
            llava.close()


def test_auto_kv_cache_loads_and_ignores_the_scales(checkpoints, scales, requests_):
    """As vLLM: the page dtype is the user's choice; with "auto" the checkpoint's scales are read
    (and checked) but the cache is in the model dtype, scales 1.0, outputs unchanged."""
    plain, scaled = checkpoints
    with_scales, without = load(scaled), load(plain)
    try:
        kv = with_scales.engine.runner.kv
        assert kv.k[0].dtype == torch.float32 and set(kv.k_scale + kv.v_scale) == {1.0}
        assert with_scales.model.kv_scales == (tuple(scales[0]), tuple(scales[1]))
        ids, logits = _generate(with_scales, requests_[1])
        ids_plain, logits_plain = _generate(without, requests_[1])
        assert ids == ids_plain and torch.equal(logits, logits_plain)
    finally:
        with_scales.close()
        without.close()


def _rename(old, new):
    def damage(tensors, qc):
        for key in [k for k in tensors if k.endswith("self_attn." + old)]:
            tensors[key.removesuffix(old) + new] = tensors.pop(key)
    return damage


@pytest.mark.parametrize("variant", ["output_scale", "legacy_kv_scale", "shape_1_bf16"])
def test_other_spellings_load(rescaled, scales, tmp_path, variant):
    """Older compressed-tensors exports store the scales as k_proj / v_proj output_scale, AutoFP8
    one kv_scale for both; [1]-shaped and bf16 scalars are the same scale."""
    def damage(tensors, qc):
        if variant == "output_scale":
            _rename("k_scale", "k_proj.output_scale")(tensors, qc)
            _rename("v_scale", "v_proj.output_scale")(tensors, qc)
        elif variant == "legacy_kv_scale":
            _rename("v_scale", "kv_scale")(tensors, qc)
            for key in [k for k in tensors if k.endswith("k_scale")]:
                tensors.pop(key)
        else:
            for key in [k for k in tensors if k.endswith("self_attn.k_scale")]:
                tensors[key] = tensors[key].reshape(1).to(torch.bfloat16)
    path = ck.fp8_dynamic(rescaled, tmp_path / "ckpt", kv_scales=scales, damage=damage)
    llava = load(path, "fp8")
    try:
        kv = llava.engine.runner.kv
        expected = {"output_scale": scales,
                    "legacy_kv_scale": (scales[1], scales[1]),
                    "shape_1_bf16": ([float(torch.tensor(s).bfloat16()) for s in scales[0]],
                                     scales[1])}[variant]
        assert (kv.k_scale, kv.v_scale) == (list(expected[0]), list(expected[1]))
    finally:
        llava.close()


def _drop(key):
    return lambda tensors, qc: tensors.pop(key)


def _set(key, value):
    return lambda tensors, qc: tensors.__setitem__(key, value)


# damage → patterns the CheckpointError must contain
TENSOR_CASES = {
    "missing_k": (_drop(L1 + "k_scale"), [f"'{L1}k_scale'", "layer 1's K cache scale",
                                          "is missing"]),
    "missing_everywhere": (_rename("v_scale", "v_gone"), [f"'{L0}v_scale'", "is missing"]),
    "nan": (_set(L0 + "v_scale", torch.tensor(float("nan"))), [f"'{L0}v_scale'", "is nan",
                                                               "model.safetensors"]),
    "zero": (_set(L1 + "k_scale", torch.tensor(0.0)), [f"'{L1}k_scale'", "is 0.0", "> 0"]),
    "negative": (_set(L0 + "k_scale", torch.tensor(-0.5)), [f"'{L0}k_scale'", "is -0.5"]),
    "infinite": (_set(L0 + "k_scale", torch.tensor(float("inf"))), [f"'{L0}k_scale'", "is inf"]),
    "no_fp32_reciprocal": (_set(L0 + "k_scale", torch.tensor(1e-39)),
                           [f"'{L0}k_scale'", "fp32 reciprocal"]),
    "per_head": (_set(L1 + "v_scale", torch.ones(2)), [f"'{L1}v_scale'", "shape [2]"]),
    "integer": (_set(L0 + "k_scale", torch.tensor(1, dtype=torch.int32)),
                [f"'{L0}k_scale'", "dtype I32"]),
    "twice": (_set(L0 + "k_proj.output_scale", torch.tensor(0.5)),
              [f"'{L0}k_scale'", f"'{L0}k_proj.output_scale'", "twice"]),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_broken_scale_is_named(rescaled, scales, tmp_path, case, monkeypatch):
    damage, patterns = TENSOR_CASES[case]
    path = ck.fp8_dynamic(rescaled, tmp_path / "ckpt", kv_scales=scales, damage=damage)
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(CheckpointError) as info:
        load(path, "fp8")
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))


def test_scales_without_a_kv_cache_scheme_are_refused(rescaled, scales, tmp_path):
    """Scales the config does not declare are not guessed at: the strict loader names them."""
    path = ck.fp8_dynamic(rescaled, tmp_path / "ckpt", kv_scales=scales,
                          damage=lambda tensors, qc: qc.__setitem__("kv_cache_scheme", None))
    with pytest.raises(WeightLoadError, match=f"'{L0}k_scale'"):
        load(path, "fp8")


def _scheme(key, value):
    return lambda tensors, qc: qc["kv_cache_scheme"].__setitem__(key, value)


SCHEME_CASES = {
    "per_head": (_scheme("strategy", "attn_head"), "kv_cache_scheme.strategy is 'attn_head'"),
    "per_channel": (_scheme("strategy", "channel"), "kv_cache_scheme.strategy is 'channel'"),
    "asymmetric": (_scheme("symmetric", False), "kv_cache_scheme.symmetric is False"),
    "dynamic": (_scheme("dynamic", True), "kv_cache_scheme.dynamic is True"),
    "int8": (_scheme("type", "int"), "kv_cache_scheme.type is 'int'"),
    "fp4": (_scheme("num_bits", 4), "kv_cache_scheme.num_bits is 4"),
    "grouped": (_scheme("group_size", 64), "kv_cache_scheme.group_size is 64"),
    "not_an_object": (lambda t, qc: qc.__setitem__("kv_cache_scheme", "fp8"),
                      "kv_cache_scheme is 'fp8'"),
}


@pytest.mark.parametrize("case", list(SCHEME_CASES))
def test_unsupported_kv_cache_scheme_is_refused_by_field(rescaled, scales, tmp_path, case,
                                                        monkeypatch):
    damage, pattern = SCHEME_CASES[case]
    path = ck.fp8_dynamic(rescaled, tmp_path / "ckpt", kv_scales=scales, damage=damage)
    for module in (loader, kv_scales):
        monkeypatch.setattr(module, "safe_open", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ConfigError) as info:
        load(path, "fp8")
    assert pattern in str(info.value), str(info.value)
