"""Image loading and preprocessing (fastllava.preprocess).

- `image_io`: `load_image(src, limits)` for URLs, data URIs and local paths, with byte, pixel and
  time limits and typed errors (`ImageError` and subclasses).
- `image_fetch`: its guarded http(s) download (host policy at connect time, total deadline).
- `processor`: `ImageProcessorConfig` + `preprocess(image, cfg, device)`, bit-identical to
  transformers' CLIPImageProcessorPil / LlavaNextImageProcessorPil, and `image_key` (the caches'
  image identity).
- `pixels`: the uint8 geometry + normalization, in numpy (CPU) or torch (the model's device).
- `resample`: Pillow's fixed-point resampler reproduced exactly in torch int32 passes.
- `anyres`: pure geometry of LLaVA-NeXT tiling and its image-token count (no torch, no PIL).

Names are re-exported lazily so that importing `fastllava.preprocess.anyres` (for token
counting in torch-free code) does not import torch or PIL.
"""

from importlib import import_module

_EXPORTS = {
    "ImageError": "image_io", "ImageFetchError": "image_io", "ImageDecodeError": "image_io",
    "ImageTooLargeError": "image_io", "ImageLimits": "image_io", "load_image": "image_io",
    "ImageProcessorConfig": "processor", "ProcessedImage": "processor", "preprocess": "processor",
    "select_best_resolution": "anyres", "anyres_grid": "anyres", "unpad_window": "anyres",
    "anyres_num_tokens": "anyres",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
