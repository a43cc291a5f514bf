"""Checkpoint key → canonical parameter name, per tensor-name layout (llava-reference.md §1.2).

This module is data plus two small functions. A *canonical* name is the engine's own parameter name
(relative to the model root, or to the source's prefix for a stand-alone vision checkpoint):

    language_model.layers.{i}.self_attn.qkv_proj.weight     (q, k, v fused: shards 0, 1, 2)
    language_model.layers.{i}.mlp.gate_up_proj.weight       (gate, up fused: shards 0, 1)
    language_model.layers.{i}.*.weight_scale                 (FP8 checkpoints; fused alike)
    vision_tower.layers.{i}.self_attn.qkv_proj.{weight,bias}
    vision_tower.embeddings.*, vision_tower.pre_layrnorm.*, multi_modal_projector.linear_{1,2}.*,
    image_newline, lm_head.weight, language_model.{embed_tokens,norm}.weight

Layouts:
    hf4          llava-hf hub files (transformers 4): language_model.model.*,
                 language_model.lm_head, vision_tower.vision_model.*, multi_modal_projector.*,
                 image_newline
    hf5          transformers 5 save_pretrained: as hf4 without the vision_model. level
    hf5_modules  transformers 5 module names: model.language_model.*, model.vision_tower.*,
                 model.multi_modal_projector.*, model.image_newline, lm_head.weight
    original     liuhaotian: model.{embed_tokens,layers,norm}.*, lm_head.weight,
                 model.mm_projector.{0,2} (index 1 is the GELU), model.image_newline,
                 model.vision_tower.vision_tower.vision_model.* (v1.6; v1.5 ships no tower)
    clip         a stand-alone CLIP / SigLIP checkpoint (the v1.5 tower): vision_model.* mapped to
                 names relative to the tower ("layers.0.…"), text_model.* and the contrastive
                 heads ignored. Load it with prefix "vision_tower.".

The HF vision encoder nests layers as `encoder.layers.{i}`; canonically they are `layers.{i}`.
Rules rewrite only prefixes; which leaf names exist is the model's business (the loader rejects a
canonical name the model does not hold), so e.g. a q_proj.bias maps to qkv_proj.bias shard 0 and is
refused there if the model has no such bias.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LAYOUTS = ("hf4", "hf5", "hf5_modules", "original")   # full LLaVA checkpoints
TOWER_LAYOUTS = ("clip",)                               # stand-alone vision checkpoints
ALL_LAYOUTS = LAYOUTS + TOWER_LAYOUTS

# Leaf names inside the HF vision model (after its prefix) → the tower's canonical names.
_VISION_LEAVES = [
    (r"encoder\.layers\.(\d+)\.(.+)", r"layers.\1.\2"),
    (r"(embeddings\.(?:class_embedding|patch_embedding\.\w+|position_embedding\.\w+))", r"\1"),
    (r"(pre_layrnorm\.\w+)", r"\1"),
]
# Vision-model keys no engine holds: post_layernorm (features are taken before it), SigLIP's
# attention-pooling head, and the position_ids buffer old transformers versions persisted.
_VISION_IGNORED = [r"post_layernorm\.\w+", r"head\..+", r"embeddings\.position_ids"]


def _layout(lm: str, lm_head: str, vision: str, projector: list[tuple[str, str]],
            newline: str) -> dict:
    """Rules for one full-model layout from its prefixes (each a regex fragment ending in a dot)."""
    rules = [(rf"{lm}(.+)", r"language_model.\1"), (rf"{lm_head}", "lm_head.weight")]
    rules += [(vision + pat, "vision_tower." + rep) for pat, rep in _VISION_LEAVES]
    rules += projector + [(newline, "image_newline")]
    ignored = [vision + pat for pat in _VISION_IGNORED]
    ignored.append(rf"{lm}(?:layers\.\d+\.self_attn\.)?rotary_emb\.(?:original_)?inv_freq")
    return {"rules": rules, "ignored": ignored}


_HF_PROJECTOR = [(r"multi_modal_projector\.(linear_[12]\.\w+)", r"multi_modal_projector.\1")]

# layout → {"rules": ordered [(regex, replacement)], "ignored": [regex]}; regexes match whole
# keys; ignored patterns are checked first.
KEYMAPS: dict[str, dict] = {
    "hf4": _layout(r"language_model\.model\.", r"language_model\.lm_head\.weight",
                   r"vision_tower\.vision_model\.", _HF_PROJECTOR, r"image_newline"),
    "hf5": _layout(r"language_model\.model\.", r"language_model\.lm_head\.weight",
                   r"vision_tower\.", _HF_PROJECTOR, r"image_newline"),
    "hf5_modules": _layout(r"model\.language_model\.", r"lm_head\.weight", r"model\.vision_tower\.",
                           [(r"model\.multi_modal_projector\.(linear_[12]\.\w+)",
                             r"multi_modal_projector.\1")],
                           r"model\.image_newline"),
    "original": _layout(r"model\.(?=embed_tokens\.|layers\.|norm\.)", r"lm_head\.weight",
                        r"model\.vision_tower\.vision_tower\.vision_model\.",
                        [(r"model\.mm_projector\.0\.(\w+)", r"multi_modal_projector.linear_1.\1"),
                         (r"model\.mm_projector\.2\.(\w+)", r"multi_modal_projector.linear_2.\1")],
                        r"model\.image_newline"),
    "clip": {
        "rules": [(r"vision_model\." + pat, rep) for pat, rep in _VISION_LEAVES],
        "ignored": [r"vision_model\." + pat for pat in _VISION_IGNORED]
        + [r"text_model\..+", r"logit_scale", r"logit_bias", r"visual_projection\.weight",
           r"text_projection\.weight"],
    },
}

# Canonical suffix → (fused suffix, shard index). Shard j fills rows
# [sum(sizes[:j]), sum(sizes[:j+1])) of the fused parameter; sizes = its module's `output_sizes`.
FUSED: dict[str, tuple[str, int]] = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj.bias", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}
# FP8 checkpoints (compressed-tensors) store one scale row per output channel next to each weight:
# the scales of fused projections fuse the same way.
FUSED.update({k + "_scale": (v + "_scale", j) for k, (v, j) in list(FUSED.items())
              if k.endswith(".weight")})

_COMPILED = {
    layout: ([(re.compile(p), r) for p, r in m["rules"]], [re.compile(p) for p in m["ignored"]])
    for layout, m in KEYMAPS.items()
}
_FUSED_RE = re.compile(r"(?:^|\.)(" + "|".join(re.escape(s) for s in FUSED) + r")$")


class UnknownKeyError(ValueError):
    """A checkpoint key that no rule of the layout maps and that is not known to be ignorable."""


def _check_layout(layout: str) -> None:
    if layout not in KEYMAPS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {ALL_LAYOUTS}")


def canonical_name(key: str, layout: str) -> tuple[str, int | None] | None:
    """(canonical parameter name, fused shard index or None), or None for a known-ignored key.

    Raises UnknownKeyError when `key` matches no rule of `layout`.
    """
    _check_layout(layout)
    rules, ignored = _COMPILED[layout]
    if any(p.fullmatch(key) for p in ignored):
        return None
    for pattern, replacement in rules:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        name = m.expand(replacement)
        f = _FUSED_RE.search(name)
        if f is None:
            return name, None
        fused, shard = FUSED[f.group(1)]
        return name[: f.start(1)] + fused, shard
    raise UnknownKeyError(f"checkpoint key {key!r} matches no rule of layout {layout!r}")


def _claims(key: str, layout: str) -> tuple[str, int | None] | None | bool:
    """canonical_name(...) or False when the layout has no rule for the key."""
    try:
        return canonical_name(key, layout)
    except UnknownKeyError:
        return False


def detect_layout(keys: Iterable[str]) -> str:
    """The layout whose rules account for every key (mapped or known-ignored).

    When several layouts account for all keys and map them identically (e.g. hf4 and hf5 for a
    checkpoint without vision weights) the first in ALL_LAYOUTS order is returned: the choice
    cannot change what is loaded. Raises ValueError for no keys, no fitting layout (naming the
    closest one and its unmatched keys), or fitting layouts that disagree.
    """
    keys = sorted(set(keys))
    if not keys:
        raise ValueError("cannot detect the checkpoint layout: the checkpoint has no tensors")
    mapped = {layout: [_claims(k, layout) for k in keys] for layout in ALL_LAYOUTS}
    fitting = [lay for lay in ALL_LAYOUTS if all(c is not False for c in mapped[lay])]
    if not fitting:
        best = max(ALL_LAYOUTS, key=lambda lay: sum(c is not False for c in mapped[lay]))
        unmatched = [k for k, c in zip(keys, mapped[best]) if c is False]
        if len(unmatched) == len(keys):
            raise ValueError(f"unknown checkpoint layout: no layout of {ALL_LAYOUTS} matches keys "
                             f"such as {keys[:5]}")
        raise ValueError(
            f"checkpoint keys fit no single layout; closest is {best!r} "
            f"({len(keys) - len(unmatched)}/{len(keys)} keys), which does not match "
            f"{_short(unmatched)}")
    first = fitting[0]
    disagreeing = [lay for lay in fitting[1:] if mapped[lay] != mapped[first]]
    if disagreeing:
        raise ValueError(f"ambiguous checkpoint layout: keys fit {[first] + disagreeing} with "
                         f"different meanings (keys such as {keys[:5]})")
    return first


def _short(items: list[str], limit: int = 10) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(repr(s) for s in items[:limit]) + more
