"""An image's identity for the prefix and feature caches: `image_key` over `rgbx_pixels`.

The key is BLAKE3 (a cryptographic hash, so a crafted image cannot collide with another user's and
be served its features) over every decoded RGB pixel, the size and the processor config, i.e.
everything the vision tower's input depends on: equal images get equal keys, and any change of
any pixel changes the key. It hashes Pillow's own 4-byte pixel layout (R, G, B, then a pad byte
set to 0 here, since Pillow leaves it 0 or 255 depending on the operation that made the image):
copying that out of Pillow is one memcpy per row, ~4x faster than packing 3-byte RGB
(`Image.tobytes`), and the same array feeds the torch path's upload.
"""

from __future__ import annotations

import sys

import blake3
import numpy as np
from PIL import Image

__all__ = ["rgbx_pixels", "image_key", "paste_rgbx_rows"]

_HASH_THREADS_FROM = 8 << 20     # bytes; below this BLAKE3's thread hand-off costs more than it saves
_SLICE_BYTES = 1 << 20           # rows hashed per step: stays in the core's L2 between copy and hash
# the pad byte is the 4th in memory: the high byte of a little-endian uint32
_RGB_MASK = np.uint32(0x00FFFFFF if sys.byteorder == "little" else 0xFFFFFF00)


def paste_rgbx_rows(rgb: Image.Image, out: np.ndarray, top: int) -> None:
    """Rows top.. of the RGB image into out (uint8 [rows, W, 4]); the pad byte as Pillow has it.

    Pillow stores RGB as 4 bytes per pixel and its C-level paste copies raw pixels between
    images of equal pixel size (clipping to the target), so pasting into an "RGBX" image mapped
    onto `out` is a plain row copy with the GIL released. If that internal API ever changes,
    `np.asarray` is the fallback.
    """
    rows, w = out.shape[:2]
    try:
        Image.frombuffer("RGBX", (w, rows), out, "raw", "RGBX", 0, 1).im.paste(
            rgb.im, (0, -top, w, rgb.height - top))
    except (AttributeError, TypeError, ValueError):
        out[..., :3] = np.asarray(rgb.crop((0, top, w, top + rows)))


def _paste_rows(rgb: Image.Image, out: np.ndarray, top: int) -> None:
    """`paste_rgbx_rows` with the pad byte zeroed (what the key hashes)."""
    paste_rgbx_rows(rgb, out, top)
    words = out.view(np.uint32)
    np.bitwise_and(words, _RGB_MASK, out=words)


def rgbx_pixels(rgb: Image.Image) -> np.ndarray:
    """uint8 [H, W, 4]: the RGB image's pixels and a zero 4th byte (what `image_key` hashes)."""
    if rgb.mode != "RGB":
        raise ValueError(f"rgbx_pixels takes an RGB image, got mode {rgb.mode!r}")
    rgb.load()
    out = np.empty((rgb.height, rgb.width, 4), np.uint8)
    _paste_rows(rgb, out, 0)
    return out


def image_key(pixels: Image.Image | np.ndarray, cfg) -> bytes:
    """16-byte BLAKE3 of `rgbx_pixels`, the size and `cfg` (an ImageProcessorConfig).

    pixels: the RGB image, hashed on the calling thread in slices of rows through one small
    reused buffer (no whole-image copy to allocate: ~12 ms for 4000x3000, 0.6-1 ms for 1024x768);
    or its `rgbx_pixels` array, hashed on all cores when large.
    """
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 4:
            raise ValueError(f"image_key takes rgbx_pixels' uint8 [H, W, 4] array, got {pixels.dtype} {pixels.shape}")
        h, w = pixels.shape[:2]
    elif pixels.mode != "RGB":
        raise ValueError(f"image_key takes an RGB image, got mode {pixels.mode!r}")
    else:
        pixels.load()
        w, h = pixels.size
    many = isinstance(pixels, np.ndarray) and h * w * 4 > _HASH_THREADS_FROM
    hasher = blake3.blake3(f"fastllava-image-v2 {(h, w)} {cfg!r}".encode(),
                           max_threads=blake3.blake3.AUTO if many else 1)
    if isinstance(pixels, np.ndarray):
        hasher.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))
        return hasher.digest(16)
    step = max(1, _SLICE_BYTES // (w * 4))
    buf = np.empty((min(step, h), w, 4), np.uint8)
    for top in range(0, h, step):
        part = buf[:min(step, h - top)]
        _paste_rows(pixels, part, top)
        hasher.update(memoryview(part).cast("B"))
    return hasher.digest(16)
