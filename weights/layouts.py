"""Rewrite a (tiny) hf5 checkpoint into another tensor-name layout, for tests and benchmarks.

    convert_checkpoint(tiny_next, "original", tmp / "orig")            # v1.6-style original
    convert_checkpoint(tiny_llava, "original", tmp / "v15", drop_vision=True)
        # v1.5-style: no tower in the LLaVA folder; tmp / "v15-vision" holds a CLIP checkpoint
        # (vision_model.*, some text_model.* and logit_scale to be ignored) named by mm_vision_tower

The tensors are copied bit for bit (renamed only), streamed one output file at a time. Config,
tokenizer, processor, template and generation files are copied; "original" gets a liuhaotian-style
flat config.json instead. No transformers import: bench/ uses this on machines without it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .discover import list_safetensors
from .keymaps import LAYOUTS, detect_layout

NUM_SHARDS = 3

# hf5 key → key in each layout (None = same). Vision keys are handled by _VISION_PREFIX.
_RENAMES = {
    "hf4": [],
    "hf5": [],
    "hf5_modules": [(r"language_model\.model\.(.+)", r"model.language_model.\1"),
                    (r"language_model\.lm_head\.weight", "lm_head.weight"),
                    (r"(multi_modal_projector\..+|image_newline)", r"model.\1")],
    "original": [(r"language_model\.model\.(.+)", r"model.\1"),
                 (r"language_model\.lm_head\.weight", "lm_head.weight"),
                 (r"multi_modal_projector\.linear_1\.(.+)", r"model.mm_projector.0.\1"),
                 (r"multi_modal_projector\.linear_2\.(.+)", r"model.mm_projector.2.\1"),
                 (r"image_newline", "model.image_newline")],
}
_VISION_PREFIX = {"hf4": "vision_tower.vision_model.", "hf5": "vision_tower.",
                  "hf5_modules": "model.vision_tower.",
                  "original": "model.vision_tower.vision_tower.vision_model."}
_COPIED_SUFFIXES = (".json", ".jinja", ".model")


def convert_checkpoint(src_dir: str | os.PathLike, layout: str, dst_dir: str | os.PathLike, *,
                       drop_vision: bool = False, shard: bool = True,
                       vision_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Write the hf5 checkpoint `src_dir` to `dst_dir` in `layout`; returns dst_dir.

    shard: NUM_SHARDS files + model.safetensors.index.json (tensors dealt round-robin, so a
    layer's q/k/v land in different files), else one model.safetensors.
    "original" also writes a stand-alone vision folder (`vision_dir`, default "<dst_dir>-vision")
    whose absolute path is the config's mm_vision_tower: with drop_vision (v1.5 style) it holds the
    tower's weights, which the LLaVA folder then lacks; without, only its config (as for v1.6, whose
    tower weights ship inside the checkpoint but whose vision config lives in the CLIP repo).
    """
    src, dst = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown target layout {layout!r}; expected one of {LAYOUTS}")
    if drop_vision and layout != "original":
        raise ValueError("drop_vision is only meaningful for the 'original' layout (LLaVA-1.5)")
    names = list_safetensors(src)
    if (found := detect_layout(names)) != "hf5":
        raise ValueError(f"{src} is in layout {found!r}; convert_checkpoint reads hf5 only")
    config = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)

    renamed, vision = {}, {}
    for key in names:
        if key.startswith("vision_tower."):
            rest = key[len("vision_tower."):]
            if drop_vision:
                vision["vision_model." + rest] = key
            else:
                renamed[_VISION_PREFIX[layout] + rest] = key
        else:
            renamed[_rename(key, layout)] = key
    _write_tensors(dst, renamed, names, shard)
    for path in sorted(src.iterdir()):
        if path.suffix in _COPIED_SUFFIXES and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(path, dst / path.name)
    if layout != "original":
        shutil.copy(src / "config.json", dst / "config.json")
        return dst
    vdir = dst.with_name(dst.name + "-vision") if vision_dir is None else pathlib.Path(vision_dir)
    _write_vision_folder(src, config, vdir, vision, names)
    (dst / "config.json").write_text(json.dumps(
        original_config(config, str(vdir.resolve()), has_tower=not drop_vision), indent=2))
    return dst


def _rename(key: str, layout: str) -> str:
    for pattern, replacement in _RENAMES[layout]:
        if (m := re.fullmatch(pattern, key)) is not None:
            return m.expand(replacement)
    return key


def _write_tensors(dst: pathlib.Path, renamed: dict[str, str], names: dict[str, pathlib.Path],
                   shard: bool, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Save renamed tensors (new key → source key) one output file at a time."""
    keys = sorted(renamed)
    count = min(NUM_SHARDS, len(keys)) if shard else 1
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)] if shard \
        else ["model.safetensors"]
    weight_map, total = {}, 0
    for i, file in enumerate(files):
        tensors = dict(extra or {}) if i == 0 else {}
        for new in keys[i::count]:
            with safe_open(names[renamed[new]], framework="pt") as f:
                tensors[new] = f.get_tensor(renamed[new])
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, dst / file, metadata={"format": "pt"})
    if shard:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def original_config(config: dict, vision_tower: str, *, has_tower: bool) -> dict:
    """A liuhaotian-style flat config.json from an hf5 llava / llava_next one."""
    text, vc = config["text_config"], config["vision_config"]
    is_next = config["model_type"] == "llava_next"
    mistral = text.get("model_type") == "mistral"
    rope_theta = (text.get("rope_parameters") or {}).get("rope_theta",
                                                          text.get("rope_theta", 10000.0))
    out = {
        "_name_or_path": "tiny-llava-original",
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava",
        "attention_bias": False, "bos_token_id": text.get("bos_token_id", 1),
        "eos_token_id": text.get("eos_token_id", 2), "pad_token_id": text.get("pad_token_id"),
        "hidden_act": text.get("hidden_act", "silu"), "hidden_size": text["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"], "pretraining_tp": 1,
        "rms_norm_eps": text["rms_norm_eps"], "rope_scaling": None, "rope_theta": rope_theta,
        "tie_word_embeddings": False, "torch_dtype": config.get("dtype", "float16"),
        "use_cache": True, "vocab_size": text["vocab_size"],
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "image_aspect_ratio": "anyres" if is_next else "pad",
        "mm_hidden_size": vc["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad" if is_next else "flat",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch" if config["vision_feature_select_strategy"] == "default"
        else "cls_patch",
        "mm_vision_select_layer": config["vision_feature_layer"],
        "mm_vision_tower": vision_tower, "unfreeze_mm_vision_tower": has_tower,
        "tokenizer_model_max_length": 4096 if is_next else 2048,
        "tokenizer_padding_side": "right", "use_mm_proj": True,
    }
    if is_next:
        out["image_grid_pinpoints"] = config["image_grid_pinpoints"]
    if mistral:
        out["sliding_window"] = text.get("sliding_window")
    return out


def _write_vision_folder(src: pathlib.Path, config: dict, vdir: pathlib.Path,
                         vision: dict[str, str], names: dict[str, pathlib.Path]) -> None:
    """A stand-alone CLIP / SigLIP checkpoint: config, preprocessor and (if any) tower weights."""
    vc = dict(config["vision_config"])
    siglip = vc["model_type"].startswith("siglip")
    vdir.mkdir(parents=True, exist_ok=True)
    text_cfg = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 0,
                "num_attention_heads": 2, "vocab_size": 8,
                "model_type": "siglip_text_model" if siglip else "clip_text_model"}
    vconfig = {"architectures": ["SiglipModel" if siglip else "CLIPModel"],
               "model_type": "siglip" if siglip else "clip", "text_config": text_cfg,
               "vision_config": vc, "torch_dtype": config.get("dtype", "float32")}
    if not siglip:
        vconfig.update(projection_dim=8, logit_scale_init_value=2.6592)
    (vdir / "config.json").write_text(json.dumps(vconfig, indent=2))
    (vdir / "preprocessor_config.json").write_text(json.dumps(_preprocessor(src, vc, siglip),
                                                              indent=2))
    if not vision:
        return
    # Tensors a real CLIP / SigLIP checkpoint carries that a LLaVA loader must ignore.
    gen = torch.Generator().manual_seed(0)
    extra = {"text_model.embeddings.token_embedding.weight": torch.randn(8, 16, generator=gen),
             "text_model.final_layer_norm.weight": torch.ones(16),
             "text_model.final_layer_norm.bias": torch.zeros(16),
             "logit_scale": torch.tensor(2.6592)}
    if siglip:
        extra["logit_bias"] = torch.zeros(1)
    else:
        num_pos = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
        extra["vision_model.embeddings.position_ids"] = torch.arange(num_pos)[None]
        extra["visual_projection.weight"] = torch.randn(8, vc["hidden_size"], generator=gen)
        extra["text_projection.weight"] = torch.randn(8, 16, generator=gen)
    _write_tensors(vdir, vision, names, shard=False, extra=extra)


def _preprocessor(src: pathlib.Path, vc: dict, siglip: bool) -> dict:
    """preprocessor_config.json of the tower repo, from the LLaVA processor's image settings."""
    ip = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (src / name).is_file():
            data = json.loads((src / name).read_text())
            ip = data.get("image_processor", data)
            break
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": ip.get("image_mean", [0.5] * 3 if siglip else
                                   [0.48145466, 0.4578275, 0.40821073]),
              "image_std": ip.get("image_std", [0.5] * 3 if siglip else
                                  [0.26862954, 0.26130258, 0.27577711]),
              "resample": ip.get("resample", 3),
              "rescale_factor": ip.get("rescale_factor", 1 / 255)}
    if siglip:
        side = vc["image_size"]
        return {**common, "image_processor_type": "SiglipImageProcessor",
                "size": {"height": side, "width": side}}
    side = vc["image_size"]
    return {**common, "image_processor_type": "CLIPImageProcessor", "do_center_crop": True,
            "crop_size": ip.get("crop_size", {"height": side, "width": side}),
            "size": ip.get("size", {"shortest_edge": side})}
