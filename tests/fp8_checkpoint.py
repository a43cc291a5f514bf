"""Tiny checkpoints for the FP8 tests, written from a tiny hf5 one (tests/tiny.py).

- `rescaled(src, dst)`: transformers initialises every weight ~ N(0, 0.02), so a 64-wide decoder
  is nearly the identity on its embeddings and its logits are flat (std ≈ 0.16): greedy argmaxes
  are then decided by noise and say nothing about FP8. Rescaled, decoder linears are
  N(0, 1/fan_in) (variance-preserving), embeddings N(0, 1) and lm_head gives logits of std ≈ 3.
- `fp8_dynamic(src, dst)`: the compressed-tensors "FP8-dynamic" layout llm-compressor publishes
  for llava-hf models (e.g. nm-testing/llava-1.5-7b-hf-FP8-dynamic): decoder linear weights as
  float8_e4m3fn plus `<module>.weight_scale` (out, 1) = amax/448 per output channel, quantized
  here independently of fastllava's code; the rest as stored; a quantization_config whose
  `ignore` names every other Linear (vision tower, projector, lm_head). With `kv_scales=(k, v)`
  also llm-compressor's calibrated FP8 KV cache: `kv_cache_scheme` (KV_CACHE_SCHEME) and one
  scalar `self_attn.k_scale` / `v_scale` per decoder layer (dequantized K = fp8 * k_scale).

Both write one model.safetensors (tiny models are small) and copy every other file.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DECODER_LINEAR = re.compile(r"language_model\.model\.layers\.\d+\."
                            r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_OTHER_LINEAR = re.compile(
    r"(vision_tower\..*(_proj|fc\d)|multi_modal_projector\.linear_\d|language_model\.lm_head)"
    r"\.weight")

FP8_DYNAMIC_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None,
    "global_compression_ratio": 1.5,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                    "dynamic": False, "group_size": None, "block_structure": None,
                    "actorder": None, "observer": "minmax", "observer_kwargs": {}},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                              "strategy": "token", "dynamic": True, "group_size": None,
                              "block_structure": None, "actorder": None,
                              "observer": "memoryless", "observer_kwargs": {}}}},
    "ignore": [],
}


# llm-compressor's kv_cache_scheme for an FP8 KV cache with static per-tensor (per-layer) scales
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                   "dynamic": False, "group_size": None, "block_structure": None,
                   "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(path, dst / path.name)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def rescaled(src: Path, dst: Path) -> Path:
    tensors = read_tensors(src)
    for key, t in tensors.items():
        if DECODER_LINEAR.fullmatch(key):
            tensors[key] = t / t.std() / t.shape[1] ** 0.5
        elif key.endswith("embed_tokens.weight"):
            tensors[key] = t / t.std()
        elif key.endswith("lm_head.weight"):
            tensors[key] = t / t.std() * 3 / t.shape[1] ** 0.5
    return write_checkpoint(src, dst, tensors, json.loads((Path(src) / "config.json").read_text()))


def quantize_channels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's FP8 channel scheme: scale = amax(|row|) / 448 (minmax observer)."""
    scale = w.float().abs().amax(dim=1, keepdim=True) / 448.0
    return (w.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def fp8_dynamic(src: Path, dst: Path, *, scale_dtype: torch.dtype = torch.float32,
                damage: Callable[[dict, dict], None] | None = None,
                kv_scales: tuple[list[float], list[float]] | None = None) -> Path:
    """Write `src` in the FP8-dynamic layout (with per-layer KV-cache scales `kv_scales`);
    `damage(tensors, quantization_config)` may alter both before they are written
    (strict-loading tests)."""
    tensors, quantized = {}, read_tensors(src)
    ignore = []
    for key, t in quantized.items():
        if DECODER_LINEAR.fullmatch(key):
            q, scale = quantize_channels(t)
            tensors[key], tensors[key + "_scale"] = q, scale.to(scale_dtype)
        else:
            tensors[key] = t
            if _OTHER_LINEAR.fullmatch(key):
                ignore.append(key.removesuffix(".weight"))
    config = json.loads((Path(src) / "config.json").read_text())
    qc = copy.deepcopy(FP8_DYNAMIC_CONFIG)
    qc["ignore"] = sorted(ignore)
    if kv_scales is not None:
        qc["kv_cache_scheme"] = copy.deepcopy(KV_CACHE_SCHEME)
        for i, (k, v) in enumerate(zip(*kv_scales)):
            layer = f"language_model.model.layers.{i}.self_attn."
            tensors[layer + "k_scale"] = torch.tensor(k, dtype=torch.float32)
            tensors[layer + "v_scale"] = torch.tensor(v, dtype=torch.float32)
    if damage is not None:
        damage(tensors, qc)
    config["quantization_config"] = qc
    return write_checkpoint(src, dst, tensors, config)
