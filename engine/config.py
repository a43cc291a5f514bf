"""Model configuration: frozen dataclasses built once from a checkpoint's config.json.

Two config layouts are accepted (llava-reference.md §1):
- llava-hf (`model_type` "llava" | "llava_next", nested `vision_config` / `text_config`). Sparse hub
  sub-configs take transformers' class defaults, which are copied here as data.
- original liuhaotian (flat Llama/Mistral fields plus `mm_*` fields); the vision tower's own config
  then comes from the separate CLIP checkpoint named by `mm_vision_tower`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fastllava import checkpoint_files
from fastllava.quant_config import QUANTIZATIONS, has_kv_cache_scales, parse_quantization_config

# transformers 5.23 class defaults for fields a hub config may omit.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                       hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_theta=10000.0, attention_bias=False, mlp_bias=False, head_dim=None,
                       sliding_window=None, tie_word_embeddings=False)
_MISTRAL_DEFAULTS = dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                         max_position_embeddings=4096 * 32, sliding_window=4096)
# Qwen2 (llava-next-72b/110b-hf, llava-interleave-qwen): Llama with biased q/k/v projections;
# its sliding_window only applies with use_sliding_window (checked in TextConfig.from_dict).
_QWEN2_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                       max_position_embeddings=32768, use_sliding_window=False, layer_types=None)
_TEXT_DEFAULTS = {"llama": _LLAMA_DEFAULTS, "mistral": _MISTRAL_DEFAULTS, "qwen2": _QWEN2_DEFAULTS}
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)
# LlavaConfig's default tower when vision_config is absent: CLIP ViT-L/14-336.
_LLAVA_CLIP_DEFAULTS = dict(_CLIP_DEFAULTS, intermediate_size=4096, hidden_size=1024,
                            patch_size=14, image_size=336, num_hidden_layers=24,
                            num_attention_heads=16)
_SIGLIP_DEFAULTS = dict(_CLIP_DEFAULTS, patch_size=16, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)
_VISION_DEFAULTS = {"clip_vision_model": _CLIP_DEFAULTS, "clip": _CLIP_DEFAULTS,
                    "siglip_vision_model": _SIGLIP_DEFAULTS, "siglip": _SIGLIP_DEFAULTS}
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# Activations the towers and the projector can run (kernels/gelu.py ACTIVATIONS), by the names
# transformers' ACT2FN gives them.
GELU_ACTS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model fastllava does not run."""


def _merged(defaults: dict, given: dict) -> dict:
    return {k: given.get(k, v) for k, v in defaults.items()}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str                  # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int     # as in the checkpoint; the tower may run fewer (see LlavaConfig)
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    num_channels: int = 3

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ConfigError(f"vision tower {self.kind!r} is not supported (clip, siglip)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision hidden_size must be a multiple of num_attention_heads")
        if self.image_size % self.patch_size:
            raise ConfigError("vision image_size must be a multiple of patch_size")
        if self.hidden_act not in GELU_ACTS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported {GELU_ACTS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:  # CLIP adds a CLS position
        return self.patches_per_side ** 2 + (1 if self.kind == "clip" else 0)

    @classmethod
    def from_dict(cls, d: dict | None, default_type: str = "clip_vision_model") -> VisionConfig:
        d = dict(d or {})
        if "vision_config" in d:  # a full CLIPConfig (the separate tower of v1.5 originals)
            d = dict(d["vision_config"], model_type=d.get("model_type", "clip") + "_vision_model")
        model_type = d.get("model_type", default_type)
        if model_type not in _VISION_DEFAULTS:
            raise ConfigError(f"vision_config.model_type {model_type!r} is not supported")
        defaults = _LLAVA_CLIP_DEFAULTS if not d else _VISION_DEFAULTS[model_type]
        f = _merged(defaults, d)
        return cls(kind="siglip" if model_type.startswith("siglip") else "clip", **f)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    model_type: str            # "llama" | "mistral" | "qwen2" (Vicuna, Mistral, Yi, Qwen2 are all
                               # Llama-family)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str = "silu"
    qkv_bias: bool = False     # Qwen2: q/k/v projections have biases (o_proj and the MLP none)
    tie_word_embeddings: bool = False  # lm_head is the embedding table (Qwen2-0.5B)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (silu)")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in _TEXT_DEFAULTS:
            raise ConfigError(f"text model_type {model_type!r} is not supported "
                              f"({', '.join(_TEXT_DEFAULTS)})")
        f = _merged(_TEXT_DEFAULTS[model_type], d)
        if model_type == "qwen2":
            if f["use_sliding_window"]:
                raise ConfigError("sliding-window attention is not supported "
                                  "(text config use_sliding_window=true)")
            if any(t != "full_attention" for t in f["layer_types"] or ()):
                raise ConfigError(f"text config layer_types {f['layer_types']} is not supported "
                                  "(only full_attention)")
            f["sliding_window"] = None   # Qwen2Config drops it without use_sliding_window
        if model_type == "llama":        # LlamaConfig has no sliding window: a stray field is inert
            f["sliding_window"] = None
        # transformers 5 writes rope_parameters = {rope_theta, rope_type}; hub files use rope_theta.
        # A legacy rope_scaling dict wins over rope_parameters (convert_rope_params_to_dict).
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        for field in ("rope_parameters", "rope_scaling"):
            given = d.get(field) or {}
            rope_type = given.get("rope_type", given.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"text config {field} rope_type {rope_type!r} is not supported "
                                  "(only default RoPE)")
        rope_theta = float(rope.get("rope_theta", f["rope_theta"]))
        for flag in ("attention_bias", "mlp_bias"):
            if f[flag]:
                raise ConfigError(f"text config {flag}=true is not supported")
        if f["sliding_window"] is not None and f["sliding_window"] < f["max_position_embeddings"]:
            raise ConfigError("sliding-window attention is not supported "
                              f"(sliding_window={f['sliding_window']}); llava-hf sets it to null")
        kv = f["num_key_value_heads"] or f["num_attention_heads"]
        head_dim = f["head_dim"] or f["hidden_size"] // f["num_attention_heads"]
        return cls(model_type=model_type, vocab_size=f["vocab_size"], hidden_size=f["hidden_size"],
                   intermediate_size=f["intermediate_size"],
                   num_hidden_layers=f["num_hidden_layers"],
                   num_attention_heads=f["num_attention_heads"], num_key_value_heads=kv,
                   head_dim=head_dim, max_position_embeddings=f["max_position_embeddings"],
                   rms_norm_eps=float(f["rms_norm_eps"]), rope_theta=rope_theta,
                   hidden_act=f["hidden_act"], qkv_bias=model_type == "qwen2",
                   tie_word_embeddings=bool(f["tie_word_embeddings"]))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    kind: str                              # "llava" (1.5, one tile) | "next" (1.6, anyres)
    layout: str                            # "hf" | "original"
    vision: VisionConfig
    text: TextConfig
    image_token_id: int | None             # None: original checkpoints splice a sentinel
    vision_feature_layers: tuple[int, ...]  # hidden-state indices (0 = embeddings), concatenated
    select_strategy: str                   # "default" drops CLS, "full" keeps every token
    projector_bias: bool = True
    projector_act: str = "gelu"            # between the projector's linears (ACT2FN name)
    pinpoints: tuple[tuple[int, int], ...] | None = None   # (h, w), NeXT only
    pad_to_square: bool = False            # original v1.5 image_aspect_ratio "pad"
    mm_vision_tower: str | None = None     # original v1.5: separate CLIP checkpoint
    quantization: str | None = None        # "fp8": the checkpoint stores FP8-dynamic weights
    kv_cache_scales: bool = False          # it stores calibrated per-layer FP8 k/v scales too

    def __post_init__(self):
        if self.kind not in ("llava", "next"):
            raise ConfigError(f"unknown LLaVA kind {self.kind!r}")
        if self.select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {self.select_strategy!r} unknown")
        if self.select_strategy == "default" and self.vision.kind != "clip":
            raise ConfigError("strategy 'default' drops a CLS token that SigLIP does not have")
        if self.kind == "next" and self.vision.kind == "clip" and self.select_strategy == "full":
            raise ConfigError("anyres with CLS tokens kept ('full') is not supported")
        if self.projector_act not in GELU_ACTS:
            raise ConfigError(f"projector_hidden_act {self.projector_act!r} is not supported "
                              f"{GELU_ACTS}")
        if self.kind == "next" and not self.pinpoints:
            raise ConfigError("LLaVA-NeXT needs image_grid_pinpoints")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(f"quantization {self.quantization!r} is not supported "
                              f"{QUANTIZATIONS}")
        n = self.vision.num_hidden_layers
        if any(not -n - 1 <= i <= n for i in self.vision_feature_layers):
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layers} out of range")

    @property
    def num_vision_layers_run(self) -> int:
        """Layers the tower must run: the deepest selected hidden state (layer -2 skips the last)."""
        n = self.vision.num_hidden_layers
        return max(i % (n + 1) for i in self.vision_feature_layers)

    @property
    def tokens_per_tile(self) -> int:
        drop = 1 if self.select_strategy == "default" else 0
        return self.vision.num_positions - drop

    @property
    def vision_feature_size(self) -> int:
        return self.vision.hidden_size * len(self.vision_feature_layers)


def _layers(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),)


def _pinpoints(v) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in v)


def _from_hf(d: dict) -> LlavaConfig:
    kind = "next" if d["model_type"] == "llava_next" else "llava"
    image_token = d.get("image_token_index", d.get("image_token_id", 32000))
    text = TextConfig.from_dict(d.get("text_config") or {})
    if d.get("tie_word_embeddings"):  # LlavaConfig ties when either level says so
        text = dataclasses.replace(text, tie_word_embeddings=True)
    pinpoints = _pinpoints(d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS) if kind == "next" else None
    return LlavaConfig(
        kind=kind, layout="hf", vision=VisionConfig.from_dict(d.get("vision_config")),
        text=text, image_token_id=image_token,
        vision_feature_layers=_layers(d.get("vision_feature_layer", -2)),
        select_strategy=d.get("vision_feature_select_strategy", "default"),
        projector_bias=d.get("multimodal_projector_bias", True),
        projector_act=d.get("projector_hidden_act", "gelu"), pinpoints=pinpoints)


# Original-repo fields are read with the defaults of haotian-liu/LLaVA's code (builder.py,
# mm_utils.process_images, llava_arch.py), which are not the values every v1.5/v1.6 config sets.
_ORIGINAL_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}


def _from_original(d: dict, vision: dict | None) -> LlavaConfig:
    def refuse(field: str, default, why: str = "is not supported"):
        value = d.get(field, default)
        shown = f"{value!r}" if field in d else f"{value!r} (the default when it is absent)"
        raise ConfigError(f"original LLaVA config: {field} {shown} {why}")

    if d.get("mm_projector_type", "linear") != "mlp2x_gelu":
        refuse("mm_projector_type", "linear", "is not supported (mlp2x_gelu)")
    # process_images: "pad" squares the image first, "anyres" tiles it, absent (or "square") is
    # the plain resize + center crop; the LLaVA-NeXT fork's other modes (anyres_max_9, highres,
    # crop_split) tile differently.
    aspect = d.get("image_aspect_ratio")
    if aspect not in (None, "pad", "anyres", "square"):
        refuse("image_aspect_ratio", None, "is not supported (pad, anyres, square)")
    kind = "next" if aspect == "anyres" else "llava"
    if kind == "next" and d.get("mm_patch_merge_type", "flat") != "spatial_unpad":
        refuse("mm_patch_merge_type", "flat", "is not supported with anyres (spatial_unpad)")
    if d.get("mm_use_im_start_end"):  # the prompt would wrap each image in <im_start>/<im_end>
        refuse("mm_use_im_start_end", False)
    if d.get("model_type", "llava") not in _ORIGINAL_TEXT_TYPES:
        refuse("model_type", None, f"is not supported ({', '.join(_ORIGINAL_TEXT_TYPES)})")
    text_type = _ORIGINAL_TEXT_TYPES[d.get("model_type", "llava")]
    text = TextConfig.from_dict({**d, "model_type": text_type})
    select = {"patch": "default", "cls_patch": "full"}.get(d.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise ConfigError(f"mm_vision_select_feature {d['mm_vision_select_feature']!r} unknown")
    pinpoints = _pinpoints(d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS) if kind == "next" else None
    return LlavaConfig(
        kind=kind, layout="original", vision=VisionConfig.from_dict(vision), text=text,
        image_token_id=None, vision_feature_layers=_layers(d.get("mm_vision_select_layer", -2)),
        select_strategy=select, projector_bias=True, pinpoints=pinpoints,
        pad_to_square=(aspect == "pad"), mm_vision_tower=d.get("mm_vision_tower"))


def read_json(path: Path) -> dict:
    """A config JSON file; damaged → CheckpointError naming it (checkpoint_files.read_json)."""
    try:
        return checkpoint_files.read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None


def load_config(path: Path, vision_tower_config: dict | None = None) -> LlavaConfig:
    """Parse `path/config.json`. For original checkpoints whose tower is separate (v1.5), pass the
    tower's config.json as `vision_tower_config`; `needs_separate_tower` says when."""
    d = read_json(Path(path) / "config.json")
    quant = dict(quantization=parse_quantization_config(d, ConfigError),
                 kv_cache_scales=has_kv_cache_scales(d))
    if d.get("model_type") in ("llava", "llava_next") and "text_config" in d:
        return dataclasses.replace(_from_hf(d), **quant)
    if "mm_vision_tower" in d or "mm_projector_type" in d:
        return dataclasses.replace(_from_original(d, vision_tower_config), **quant)
    raise ConfigError(f"{path}/config.json is not a LLaVA config "
                      f"(model_type={d.get('model_type')!r}, no text_config or mm_* fields)")


def is_original_layout(path: Path) -> bool:
    d = read_json(Path(path) / "config.json")
    return "text_config" not in d and ("mm_vision_tower" in d or "mm_projector_type" in d)


# generation_config.json fields under which transformers' generate() does not pick the plain
# argmax, greedy included (its logits processors, or beam search), with the value that is off.
# fastllava applies none of them. Sampling-only fields (top_k, typical_p, ...) are left out: a
# request's own temperature / top_p decide how it samples, not the checkpoint's defaults.
GREEDY_CHANGING_FIELDS = (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0),
                          ("num_beams", 1), ("min_new_tokens", 0), ("bad_words_ids", None),
                          ("suppress_tokens", None), ("begin_suppress_tokens", None),
                          ("sequence_bias", None), ("forced_bos_token_id", None),
                          ("forced_eos_token_id", None),
                          ("exponential_decay_length_penalty", None))


def unapplied_generation_fields(path: Path) -> dict[str, object]:
    """The GREEDY_CHANGING_FIELDS generation_config.json sets to something other than off."""
    f = Path(path) / "generation_config.json"
    d = read_json(f) if f.exists() else {}
    return {name: d[name] for name, off in GREEDY_CHANGING_FIELDS
            if d.get(name) not in (None, off, [], {})}


def eos_token_ids(path: Path, text: dict | None = None) -> tuple[int, ...]:
    """Stop ids: generation_config.json's eos_token_id (int or list), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        f = Path(path) / name
        if f.exists():
            d = read_json(f)
            sub = d.get("text_config")
            eos = d.get("eos_token_id", sub.get("eos_token_id") if isinstance(sub, dict) else None)
            if eos is None:
                continue
            try:
                return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
            except (TypeError, ValueError):
                raise checkpoint_files.damaged(f, f"eos_token_id is {eos!r}, not a token id or a "
                                               "list of token ids") from None
    return ()
