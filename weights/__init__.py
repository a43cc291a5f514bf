"""fastllava.weights: find a checkpoint, map its tensor names, load it strictly and streaming.

    path = resolve_model_path("llava-hf/llava-v1.6-mistral-7b-hf")   # or a local folder
    layout = detect_layout(list_safetensors(path))
    load_weights(model, [(path, layout, "")], dtype=torch.bfloat16, device="cuda")

A LLaVA-1.5 original checkpoint has no vision tower: add its CLIP folder (config mm_vision_tower)
as a second source, [(path, "original", ""), (clip_path, "clip", "vision_tower.")].
"""

from .discover import (CheckpointError, CheckpointNotFoundError, list_safetensors, read_shards,
                       resolve_model_path)
from .keymaps import (ALL_LAYOUTS, LAYOUTS, TOWER_LAYOUTS, UnknownKeyError, canonical_name,
                      detect_layout)
from .layouts import convert_checkpoint
from .loader import WeightLoadError, load_weights

__all__ = [
    "ALL_LAYOUTS", "LAYOUTS", "TOWER_LAYOUTS", "CheckpointError", "CheckpointNotFoundError",
    "UnknownKeyError", "WeightLoadError", "canonical_name", "convert_checkpoint", "detect_layout",
    "list_safetensors", "load_weights", "read_shards", "resolve_model_path",
]
