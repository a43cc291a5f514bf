"""Checkpoint folder (or hub id) → config, model with weights, tokenizer, chat template, image config.

quantization="fp8" (or a checkpoint whose config.json declares compressed-tensors FP8-dynamic)
builds the decoder's linear layers as Fp8Linear (models/layers.py); the loader quantizes floating
checkpoint weights into them as they stream in, or copies pre-quantized ones. A checkpoint
that also declares a `kv_cache_scheme` gives calibrated per-layer FP8 KV-cache scales
(weights/kv_scales.py), kept on `LlavaModel.kv_scales` for an fp8 KV cache to use.

Original liuhaotian v1.5 checkpoints ship no vision weights: the tower (and its image processor
config) come from the CLIP checkpoint named by `mm_vision_tower`, a local folder or a hub id.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from fastllava.config import (LlavaConfig, eos_token_ids, is_original_layout, load_config, read_json,
                              unapplied_generation_fields)
from fastllava.kv_cache import KVScales
from fastllava.models.layers import use_fp8_linears
from fastllava.models.llava import LlavaModel
from fastllava.models.parallel import TensorParallel, TensorParallelError, shard_decoder
from fastllava.preprocess.processor import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
from fastllava.text.template import BUILTIN_TEMPLATES, load_chat_template, template_family
from fastllava.text.tokenizer import Tokenizer
from fastllava.weights.discover import CheckpointNotFoundError, list_safetensors, resolve_model_path
from fastllava.weights.keymaps import detect_layout
from fastllava.weights.kv_scales import read_kv_scales
from fastllava.weights.loader import load_weights
from fastllava.weights.progress import ProgressCallback


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path
    config: LlavaConfig
    model: LlavaModel
    tokenizer: Tokenizer
    template: str
    image_config: ImageProcessorConfig
    device: torch.device
    dtype: torch.dtype
    eos_ids: tuple[int, ...]        # generation_config.json's (else config.json's) eos_token_id
    quantization: str | None = None  # "fp8": decoder linears in FP8 (asked, or the checkpoint's)


def _has_processor_config(path: Path) -> bool:
    return (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists()


def _image_config(config: LlavaConfig, folders: list[Path]) -> ImageProcessorConfig:
    pad = config.pad_to_square
    for folder in folders:
        if _has_processor_config(folder):
            return ImageProcessorConfig.from_dir(folder, pinpoints=config.pinpoints, pad_to_square=pad)
    # Original v1.6 folders ship none: the tower's own CLIP processor at its native size.
    s = config.vision.image_size
    mean, std = (CLIP_MEAN, CLIP_STD) if config.vision.kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
    return ImageProcessorConfig(shortest_edge=s, crop_h=s, crop_w=s, image_mean=mean, image_std=std,
                                pinpoints=config.pinpoints, pad_to_square=pad)


def _vision_tower_folder(path: Path, names: dict) -> tuple[Path | None, bool]:
    """For original checkpoints: the folder of `mm_vision_tower` and whether its weights are needed.

    v1.5 originals ship no vision weights: the tower folder (local, or a hub id) is required.
    v1.6 originals ship the weights but not the tower's config: fetch its config files only, and
    fall back to CLIP ViT-L/14-336 (every v1.6 tower; the strict loader checks the shapes) when
    it can't be had offline."""
    if not is_original_layout(path):
        return None, False
    tower = read_json(path / "config.json").get("mm_vision_tower")
    needs_weights = not any("vision_tower" in k for k in names)
    if not tower:
        if needs_weights:
            raise ValueError(f"{path} has no vision tower weights and no mm_vision_tower")
        return None, False
    local = Path(tower).expanduser()
    if not local.is_absolute() and (path / local).is_dir():  # relative to the checkpoint folder
        local = path / local
    ref = str(local) if local.is_dir() else tower
    try:
        return resolve_model_path(ref, config_only=not needs_weights), needs_weights
    except CheckpointNotFoundError:
        if needs_weights:
            raise
        return None, False


def _check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need FP8 tensor cores (sm_89: L4, H100, H200...); say so before loading rather
    than fail in the first forward. The CPU runs them (slowly) everywhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"quantization 'fp8' needs a GPU with FP8 support (compute capability "
                         f">= 8.9: L4, H100, H200); {torch.cuda.get_device_name(device)} is "
                         f"{major}.{minor}")


def load_checkpoint(model: str, *, device: torch.device, dtype: torch.dtype,
                    revision: str | None = None, progress: bool = False,
                    quantization: str | None = None, tp: TensorParallel | None = None
                    ) -> LoadedCheckpoint:
    """quantization None takes the checkpoint's own (config.json quantization_config), if any.
    tp: load only this tensor-parallel rank's shard of the decoder (models/parallel.py).
    Every file is read and checked (shard headers included) before any weight is: a damaged
    or missing one fails in milliseconds, with nothing printed before its one-line error."""
    path = resolve_model_path(model, revision=revision, progress=progress)
    names = list_safetensors(path)
    tower, tower_weights = _vision_tower_folder(path, names)
    config = load_config(path, read_json(tower / "config.json") if tower else None)
    if config.text.tie_word_embeddings and any(k.endswith("lm_head.weight") for k in names):
        # transformers 5 ties only when the checkpoint stores no lm_head of its own
        config = dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                      tie_word_embeddings=False))
    tokenizer = Tokenizer.from_dir(path)
    template = load_chat_template(path) or BUILTIN_TEMPLATES[
        template_family(tokenizer, config.text.model_type)]
    image_config = _image_config(config, [path] + ([tower] if tower else []))
    eos_ids = eos_token_ids(path)
    unapplied = unapplied_generation_fields(path)
    if unapplied:
        warnings.warn(f"{path / 'generation_config.json'} sets {unapplied}: fastllava does not "
                      "apply these, transformers' generate() does (greedy included), so outputs "
                      "may differ from transformers'", UserWarning, stacklevel=3)
    sources = [(path, detect_layout(names), "")]
    if tower_weights:
        sources.append((tower, "clip", "vision_tower."))

    quantization = quantization or config.quantization
    if quantization == "fp8":
        _check_fp8_device(device)
    if tp is not None and quantization == "fp8":
        raise TensorParallelError("tensor parallelism with quantization 'fp8' is not supported "
                                  "yet: use tensor_parallel_size 1 or an unquantized model")
    with torch.device("meta"):
        llava = LlavaModel(config)
        if tp is not None:
            shard_decoder(llava, tp)
    # Cast on the meta device (free), then allocate once in the final dtype: never an fp32 copy.
    llava = llava.to(dtype)
    if quantization == "fp8":  # after the cast, which would cast FP8 weights and scales too
        use_fp8_linears(llava.language_model)
    llava = llava.to_empty(device=device)
    llava.reset_buffers()
    llava.eval().requires_grad_(False)

    read_elsewhere = frozenset()
    if config.kv_cache_scales:   # scalars, read whole by every tensor-parallel rank
        k, v, read_elsewhere = read_kv_scales(path, sources[0][1], config.text.num_hidden_layers)
        llava.kv_scales = KVScales(k, v)
    bar = ProgressCallback("loading weights", "tensor") if progress else None
    try:
        load_weights(llava, sources, dtype=dtype, device=device, progress=bar,
                     read_elsewhere=read_elsewhere)
    finally:
        if bar is not None:
            bar.close()
    return LoadedCheckpoint(path, config, llava, tokenizer, template, image_config, device, dtype,
                            eos_ids, quantization)
