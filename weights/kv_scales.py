"""Calibrated FP8 KV-cache scales from a compressed-tensors checkpoint: one per decoder layer
for K and one for V, read when config.json declares a `kv_cache_scheme` (engine/quant_config.py).

Where they are stored (names after the layout's key map, weights/keymaps.py, e.g. hf4's
`language_model.model.layers.{i}.` → `language_model.layers.{i}.`):

    language_model.layers.{i}.self_attn.k_scale, .v_scale         llm-compressor
    language_model.layers.{i}.self_attn.k_proj.output_scale,       older compressed-tensors exports
                                      .v_proj.output_scale        (the k/v projections' outputs)
    language_model.layers.{i}.self_attn.kv_scale                  legacy (AutoFP8): K and V share it

each a scalar, shape [] or [1], in a floating dtype. The meaning is compressed-tensors' (and
vLLM's): dequantized K = fp8 value * k_scale, the KV cache's own convention (stored = K / k_scale,
kernels/kv_quant.py), so a scale is used as stored, rounded to fp32 as the kernels take it.

Strict: every layer's K and V scale present exactly once, finite, > 0 and with a finite fp32
reciprocal; anything else is a CheckpointError naming the tensor and its file. The scales are
read here, not by the sharding weight loader: under tensor parallelism every rank reads the same
scalars, as each holds every layer's cache for its own KV heads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from safetensors import safe_open

from fastllava.checkpoint_files import CheckpointError
from fastllava.kernels.kv_quant import inv_scale, to_fp32

from .discover import read_shards
from .keymaps import UnknownKeyError, canonical_name
from .shards import FLOAT_DTYPES, TensorInfo

_SCALE = re.compile(r"language_model\.layers\.(\d+)\.self_attn\."
                    r"(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)")
# stored name → which of the layer's scales it gives
_GIVES = {"k_scale": "k", "k_proj.output_scale": "k", "v_scale": "v",
          "v_proj.output_scale": "v", "kv_scale": "kv"}
_NAME = {"k": "K", "v": "V"}


def read_kv_scales(folder: Path, layout: str, num_layers: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...], frozenset[str]]:
    """(k_scales, v_scales) per decoder layer, and the checkpoint keys they were read from
    (for the weight loader to leave alone)."""
    shards = read_shards(Path(folder))
    found: dict[tuple[int, str], str] = {}   # (layer, "k" | "v") → checkpoint key
    first_q: dict[int, str] = {}        # layer → its q_proj key (to name a missing scale)
    for key in shards:
        try:
            mapped = canonical_name(key, layout)
        except UnknownKeyError:
            continue                                # the weight loader names it
        name = mapped[0] if mapped else ""
        if name.endswith("self_attn.qkv_proj.weight") and mapped[1] == 0:
            first_q[int(name.split(".")[2])] = key
        m = _SCALE.fullmatch(name)
        if m is None or int(m.group(1)) >= num_layers:
            continue                                # a layer the model lacks: the loader names it
        layer = int(m.group(1))
        for kind in _GIVES[m.group(2)]:
            if (layer, kind) in found:
                raise CheckpointError(
                    f"checkpoint {folder}: layer {layer}'s {_NAME[kind]} cache scale is stored "
                    f"twice, as {found[layer, kind]!r} and {key!r}; keep one")
            found[layer, kind] = key
    scales: dict[str, list[float]] = {"k": [], "v": []}
    for layer in range(num_layers):
        for kind in "kv":
            key = found.get((layer, kind))
            if key is None:
                raise CheckpointError(
                    f"checkpoint {folder}: tensor {_missing_key(layer, kind, found, first_q)!r} "
                    f"(layer {layer}'s {_NAME[kind]} cache scale) is missing; config.json "
                    "declares a kv_cache_scheme, so every decoder layer needs self_attn.k_scale "
                    "and self_attn.v_scale: re-download or re-export the checkpoint")
            scales[kind].append(_read_scale(shards[key], key))
    return tuple(scales["k"]), tuple(scales["v"]), frozenset(found.values())


def _read_scale(info: TensorInfo, key: str) -> float:
    where = f"checkpoint file {info.file}: KV-cache scale tensor {key!r}"
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {info.dtype}; a scale is one of "
                              f"{', '.join(FLOAT_DTYPES)}")
    if info.shape not in ((), (1,)):
        raise CheckpointError(f"{where} has shape {list(info.shape)}; fastllava reads one scale "
                              "per layer (kv_cache_scheme strategy 'tensor'): shape [] or [1]")
    with safe_open(info.file, framework="pt", device="cpu") as f:
        value = f.get_tensor(key).item()
    # The kernels take the scale and its reciprocal as fp32 numbers (kernels/kv_quant.py).
    try:
        scale = to_fp32(value)
        ok = math.isfinite(scale) and scale > 0 and math.isfinite(inv_scale(scale))
    except OverflowError:                            # beyond fp32, or its reciprocal is
        ok = False
    if not ok:
        raise CheckpointError(f"{where} is {value!r}; a scale must be finite and > 0 (with a "
                              "finite fp32 reciprocal): dequantized K/V = fp8 value * scale")
    return scale


def _missing_key(layer: int, kind: str, found: dict, first_q: dict) -> str:
    """How the checkpoint would spell layer `layer`'s missing scale: like another layer's, else
    beside the layer's q_proj weight, else the canonical name."""
    for (other, k), key in found.items():
        if k == kind and _GIVES[key.rsplit("self_attn.", 1)[1]] == kind:
            return key.replace(f".layers.{other}.", f".layers.{layer}.")
    if layer in first_q:
        return first_q[layer].removesuffix("q_proj.weight") + f"{kind}_scale"
    return f"language_model.layers.{layer}.self_attn.{kind}_scale"
