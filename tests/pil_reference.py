"""Today's (pre-torch) preprocessing path, kept verbatim as the reference the new pipeline must
match bit for bit: Pillow geometry on PIL images, a torch table lookup per tile. transformers'
processors are the other reference (tests/test_preprocess.py); this one also times "today's
path" in bench/preprocess.py.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fastllava.preprocess.anyres import pad_offsets, resize_within, select_best_resolution
from fastllava.preprocess.processor import (ImageProcessorConfig, ProcessedImage, convert_to_rgb,
                                            normalize_table)


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The original LLaVA-1.5 "pad" mode: centre the image on a square of colour `fill`.

    Copied from haotian-liu/LLaVA `mm_utils.expand2square`: the offset on the short axis is
    `(long - short) // 2` (the odd leftover goes bottom/right). Square images pass through.
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _resize_shortest(image: Image.Image, cfg: ImageProcessorConfig) -> Image.Image:
    """transformers' `get_resize_output_image_size(default_to_square=False)` + PIL resize.

    The short side becomes `shortest_edge`; the long side is `int(shortest_edge * long / short)`
    (integer product, float division, truncation). PIL returns a copy when the size is unchanged.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    return image.resize((new_w, new_h), resample=cfg.resample)


def _center_crop(chw: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [3, crop_h, crop_w], as `image_transforms.center_crop`.

    Crop offset `(h - crop_h) // 2`; when the image is smaller than the crop it is first
    placed on a zero canvas at `ceil(slack / 2)` (the odd pixel goes top/left here, unlike the
    anyres padding), then cropped.
    """
    _, h, w = chw.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return chw[:, top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    canvas = chw.new_zeros((chw.shape[0], new_h, new_w))
    canvas[:, pad_top:pad_top + h, pad_left:pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _finish_tile(tile: Image.Image, cfg: ImageProcessorConfig, table: torch.Tensor) -> torch.Tensor:
    """RGB PIL tile -> float32 [3, crop_h, crop_w]: resize, crop, table lookup."""
    tile = _resize_shortest(tile, cfg)
    chw = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1)  # (3, h, w) uint8
    if cfg.do_center_crop:
        chw = _center_crop(chw, cfg.crop_h, cfg.crop_w)
    c, h, w = chw.shape
    return table.gather(1, chw.reshape(c, h * w).long()).reshape(c, h, w)


def _anyres_tiles(rgb: Image.Image, cfg: ImageProcessorConfig) -> tuple[list[Image.Image], tuple[int, int]]:
    """LlavaNextImageProcessorPil.get_image_patches: [base] + grid tiles (row-major), and the grid.

    The image is resized (aspect kept, `resize_within`) into the best pinpoint canvas, pasted on
    black at `pad_offsets`, and cut into crop_h-sized square tiles; the base image is the whole
    original resized to shortest_edge x shortest_edge (aspect NOT kept).
    """
    tile = cfg.crop_h
    target_h, target_w = select_best_resolution((rgb.height, rgb.width), cfg.pinpoints)
    new_h, new_w = resize_within((rgb.height, rgb.width), (target_h, target_w))
    top, left = pad_offsets((new_h, new_w), (target_h, target_w))
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(rgb.resize((new_w, new_h), resample=cfg.resample), (left, top))
    rows, cols = target_h // tile, target_w // tile
    tiles = [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    base = rgb.resize((cfg.shortest_edge, cfg.shortest_edge), resample=cfg.resample)
    return [base, *tiles], (rows, cols)


def reference_preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """A PIL image of any mode -> `ProcessedImage` (see the module docstring for the rules)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"cannot preprocess an empty image of size {image.size}")
    if cfg.do_convert_rgb:
        rgb = convert_to_rgb(image)
    elif image.mode == "RGB":
        rgb = image
    else:
        raise ValueError(f"do_convert_rgb is False but the image has mode {image.mode!r}; "
                         "only RGB images can skip the conversion")
    image_size = (rgb.height, rgb.width)
    grid = None
    if cfg.pinpoints is not None:
        tiles, grid = _anyres_tiles(rgb, cfg)
    elif cfg.pad_to_square:
        tiles = [expand2square(rgb, cfg.pad_color)]
    else:
        tiles = [rgb]
    table = normalize_table(cfg)
    pixel_values = torch.stack([_finish_tile(t, cfg, table) for t in tiles])
    return ProcessedImage(pixel_values=pixel_values, image_size=image_size, grid=grid, key=b"")
