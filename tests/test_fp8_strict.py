"""Pre-quantized checkpoints (compressed-tensors FP8-dynamic) are loaded strictly: a broken
scale, an FP8 tensor where fastllava keeps the model dtype, or any other quantization scheme is
an error naming the tensor and its file, or the config field."""

from __future__ import annotations

import pytest
import torch

import fp8_checkpoint as ck
from fastllava import LLaVA
from fastllava.config import ConfigError
from fastllava.weights import CheckpointError, WeightLoadError, loader


def _load(path, **kwargs) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", **kwargs)


L0 = "language_model.model.layers.0."


def _drop(key):
    return lambda tensors, qc: tensors.pop(key)


def _set(key, fn):
    return lambda tensors, qc: tensors.__setitem__(key, fn(tensors[key]))


# damage → (error class, patterns the message must contain)
WEIGHT_CASES = {
    "missing_scale": (_drop(L0 + "self_attn.k_proj.weight_scale"), WeightLoadError,
                      ["never assigned", "layers.0.self_attn.qkv_proj.weight_scale[k_proj]"]),
    "scale_not_per_channel_shape": (
        _set(L0 + "mlp.down_proj.weight_scale", lambda s: s.reshape(-1)), WeightLoadError,
        ["shape mismatches", f"'{L0}mlp.down_proj.weight_scale' (model.safetensors)",
         "expected [64, 1], got [64]"]),
    "scale_rows": (_set(L0 + "mlp.up_proj.weight_scale", lambda s: s[:-1]), WeightLoadError,
                   ["'language_model.model.layers.0.mlp.up_proj.weight_scale'",
                    "expected [128, 1], got [127, 1]"]),
    "float_weight_with_a_scale": (
        _set(L0 + "self_attn.o_proj.weight", lambda w: w.float()), WeightLoadError,
        ["assigned twice", "self_attn.o_proj.weight_scale"]),
    "fp8_vision_tower": (
        _set("vision_tower.encoder.layers.0.mlp.fc1.weight", lambda w: w.to(torch.float8_e4m3fn)),
        CheckpointError, ["'vision_tower.encoder.layers.0.mlp.fc1.weight'", "model.safetensors",
                          "F8_E4M3", "decoder's linear layers"]),
    "fp8_scale": (_set(L0 + "mlp.down_proj.weight_scale", lambda s: s.to(torch.float8_e4m3fn)),
                  CheckpointError, [f"'{L0}mlp.down_proj.weight_scale'", "F8_E4M3"]),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_damaged_prequantized_tensors_are_named(tiny_next, tmp_path, case):
    damage, error, patterns = WEIGHT_CASES[case]
    path = ck.fp8_dynamic(tiny_next, tmp_path / "ckpt", damage=damage)
    with pytest.raises(error) as info:
        _load(path)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))


def _group(part, key, value):
    def damage(tensors, qc):
        qc["config_groups"]["group_0"][part][key] = value
    return damage


def _config(key, value):
    return lambda tensors, qc: qc.__setitem__(key, value)


CONFIG_CASES = {
    "quant_method": (_config("quant_method", "gptq"), "quant_method is 'gptq'"),
    "format": (_config("format", "pack-quantized"), "format is 'pack-quantized'"),
    "kv_cache_scheme": (_config("kv_cache_scheme", {"num_bits": 8, "type": "float"}),
                        "kv_cache_scheme"),
    "no_groups": (_config("config_groups", {}), "config_groups is {}"),
    "per_tensor_weights": (_group("weights", "strategy", "tensor"),
                           "group_0.weights.strategy is 'tensor'"),
    "int8_weights": (_group("weights", "type", "int"), "group_0.weights.type is 'int'"),
    "static_activations": (_group("input_activations", "dynamic", False),
                           "input_activations.dynamic is False"),
    "grouped_weights": (_group("weights", "group_size", 128), "weights.group_size is 128"),
    "weight_only": (lambda t, qc: qc["config_groups"]["group_0"].__setitem__(
        "input_activations", None), "group_0.input_activations is None"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_unsupported_quantization_config_is_refused_by_field(tiny_next, tmp_path, case,
                                                            monkeypatch):
    damage, pattern = CONFIG_CASES[case]
    path = ck.fp8_dynamic(tiny_next, tmp_path / "ckpt", damage=damage)
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ConfigError, match="compressed-tensors FP8-dynamic") as info:
        _load(path)
    assert pattern in str(info.value), str(info.value)


def test_unknown_quantization_is_refused_before_loading(tiny_next, monkeypatch):
    monkeypatch.setattr(loader, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=r"quantization must be one of \('fp8',\)"):
        _load(tiny_next, quantization="int4")


def test_older_compression_config_key_is_read(tiny_next, tmp_path):
    """Older compressed-tensors exports name the block `compression_config` (as
    nm-testing/llava-1.5-7b-hf-FP8-dynamic once did): same meaning, same strictness."""
    import json

    from fastllava.config import load_config

    folder = ck.fp8_dynamic(tiny_next, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["compression_config"] = config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    assert load_config(folder).quantization == "fp8"
    config["compression_config"]["format"] = "int-quantized"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"compression_config.format is 'int-quantized'"):
        load_config(folder)
