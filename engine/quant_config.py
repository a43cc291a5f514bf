"""config.json's `quantization_config` → the quantization fastllava runs, or a ConfigError.

One scheme is accepted: compressed-tensors "FP8-dynamic" (llm-compressor's FP8_DYNAMIC preset,
as published for llava-hf models, e.g. nm-testing/llava-1.5-7b-hf-FP8-dynamic):

    "quantization_config": {
      "quant_method": "compressed-tensors", "format": "float-quantized",
      "quantization_status": "compressed", "kv_cache_scheme": null (or as below),
      "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": true,
                    "dynamic": false, "group_size": null, ...},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token",
                              "symmetric": true, "dynamic": true, ...},
        "output_activations": null}},
      "ignore": ["language_model.lm_head", "vision_tower...", "multi_modal_projector..."]}

i.e. weights stored as float8_e4m3fn with `<module>.weight_scale` (out, 1), activations
quantized per token at run time. Older exports name the block `compression_config`. Which
tensors are quantized is read from the tensors themselves (dtype F8_E4M3 plus a scale): the
loader holds FP8 only for the decoder's linear layers and names any other FP8 tensor.

A `kv_cache_scheme` may come with it: llm-compressor's calibrated FP8 KV cache,

    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                        "symmetric": true, "dynamic": false, "group_size": null, ...}

i.e. one static scale per layer for K and one for V (`self_attn.k_scale` / `v_scale`, read by
weights/kv_scales.py), dequantized K = fp8 * k_scale. Per-head or per-channel strategies,
asymmetric (zero points), dynamic, int or other bit widths are refused by field.

Anything else (static or per-tensor weight scales, int8, groups, blocks) is refused by name
rather than run with the wrong numerics.
"""

from __future__ import annotations

from typing import Any

QUANTIZATIONS = ("fp8",)   # what `quantization=` accepts

_WEIGHTS = {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True,
            "dynamic": False}
_ACTIVATIONS = {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True,
                "dynamic": True}
# One static e4m3 scale per layer for K and one for V: what the KV cache holds (kv_cache.py).
_KV_CACHE = {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True,
             "dynamic": False}
_ABSENT_OR_NULL = ("group_size", "block_structure")


def parse_quantization_config(d: dict, error: type[Exception]) -> str | None:
    """"fp8" for a compressed-tensors FP8-dynamic config.json, None for an unquantized one;
    `error` (ConfigError) for any other quantization_config, naming the offending field."""
    q = d.get("quantization_config", d.get("compression_config"))
    if q is None:
        return None
    where = "quantization_config" if "quantization_config" in d else "compression_config"
    if not isinstance(q, dict):
        raise error(f"config.json {where} must be an object, got {type(q).__name__}")

    def need(cond: bool, field: str, value: Any, expected: str) -> None:
        if not cond:
            raise error(f"config.json {where}.{field} is {value!r}: fastllava loads only "
                        f"compressed-tensors FP8-dynamic checkpoints ({expected})")

    method = q.get("quant_method")
    need(method == "compressed-tensors", "quant_method", method, "'compressed-tensors'")
    need(q.get("format") == "float-quantized", "format", q.get("format"), "'float-quantized'")
    status = q.get("quantization_status", "compressed")
    need(status == "compressed", "quantization_status", status, "'compressed'")
    kv = q.get("kv_cache_scheme")
    if kv is not None:
        _check_args(kv, "kv_cache_scheme", _KV_CACHE, need,
                    "; the KV cache takes one static FP8 scale per layer for K and one for V")
    groups = q.get("config_groups")
    need(isinstance(groups, dict) and len(groups) > 0, "config_groups", groups,
         "at least one group")
    for name, group in groups.items():
        path = f"config_groups.{name}"
        need(isinstance(group, dict), path, group, "an object")
        targets = group.get("targets")
        need(isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets),
             f"{path}.targets", targets, "a list of module names, e.g. ['Linear']")
        _check_args(group.get("weights"), f"{path}.weights", _WEIGHTS, need)
        _check_args(group.get("input_activations"), f"{path}.input_activations", _ACTIVATIONS,
                    need)
        out = group.get("output_activations")
        need(out is None, f"{path}.output_activations", out, "none")
    ignore = q.get("ignore", [])
    need(isinstance(ignore, list) and all(isinstance(i, str) for i in ignore), "ignore", ignore,
         "a list of module names")
    return "fp8"


def has_kv_cache_scales(d: dict) -> bool:
    """Whether a config.json that `parse_quantization_config` accepted declares calibrated
    per-layer FP8 KV-cache scales (a `kv_cache_scheme`)."""
    q = d.get("quantization_config", d.get("compression_config"))
    return isinstance(q, dict) and q.get("kv_cache_scheme") is not None


def _check_args(args: Any, path: str, expected: dict, need, why: str = "") -> None:
    need(isinstance(args, dict), path, args, "an object" + why)
    for key, value in expected.items():
        need(args.get(key) == value and type(args.get(key)) is type(value), f"{path}.{key}",
             args.get(key), f"{key} {value!r}{why}")
    for key in _ABSENT_OR_NULL:
        need(args.get(key) is None, f"{path}.{key}", args.get(key), "null" + why)
