"""LLaVA-NeXT "anyres" geometry: grid choice, resize/pad boxes, unpad window, token count.

Pure integer/float arithmetic (no PIL, no torch) so the scheduler and the HTTP server can count
image tokens without touching pixels. Every formula copies transformers 5.23 operation for
operation (llava-reference.md §4.3-4.4); the comments name the function it mirrors, because the
rounding points (int() truncation, ceil, round(x, 7), the order of a multiply and a divide) are
what decides a grid or a token count on some sizes.

Conventions: sizes are (height, width) tuples; pinpoints are (h, w) pairs, as transformers reads
`image_grid_pinpoints` (the original LLaVA repo reads them as (w, h): we follow transformers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = [
    "select_best_resolution",
    "anyres_grid",
    "resize_within",
    "pad_offsets",
    "unpad_window",
    "anyres_num_tokens",
]


def _check_hw(image_hw: Sequence[int], what: str = "image_hw") -> tuple[int, int]:
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive (height, width), got {tuple(image_hw)}")
    return h, w


def select_best_resolution(image_hw: Sequence[int], pinpoints: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most image pixels, then wastes the fewest.

    Mirrors `transformers.image_processing_utils.select_best_resolution`: for each candidate,
    `scale = min(pw / W, ph / H)`; effective = min(int(W*scale) * int(H*scale), W*H) (note the
    int() truncation of each side and the cap at the original area); ties on effective go to
    the smaller waste, and exact ties to the FIRST listed candidate (strict comparisons).
    """
    height, width = _check_hw(image_hw)
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    if best is None:
        raise ValueError(f"no usable pinpoint in {pinpoints!r} for an image of (h, w) {(height, width)}")
    return best


def anyres_grid(image_hw: Sequence[int], pinpoints, tile: int) -> tuple[int, int]:
    """(grid_rows, grid_cols) of `tile`-sized tiles cut from the chosen pinpoint canvas.

    Mirrors `get_anyres_image_grid_shape`: `h // tile, w // tile` of the best resolution.
    """
    ph, pw = select_best_resolution(image_hw, pinpoints)
    return ph // tile, pw // tile


def resize_within(image_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """(new_h, new_w) the image is resized to inside the target canvas, aspect ratio kept.

    Mirrors `get_patch_output_size`: the side with the smaller scale is set to the target, the
    other is `min(ceil(side * scale), target)` (ceil, not round).
    """
    height, width = _check_hw(image_hw)
    th, tw = (int(v) for v in target_hw)
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def pad_offsets(inner_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """(top, left) where a resized image of `inner_hw` sits on the `target_hw` canvas.

    Mirrors `LlavaNextImageProcessorPil._get_padding_size`: floor of half the slack; the odd
    leftover row/column goes to the bottom/right.
    """
    return (int(target_hw[0]) - int(inner_hw[0])) // 2, (int(target_hw[1]) - int(inner_hw[1])) // 2


def unpad_window(image_hw: Sequence[int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open, of the feature cells that cover real image pixels.

    On a `rows` x `cols` feature grid (rows = grid_rows * patches_per_side) of a padded tile
    canvas, mirrors `modeling_llava_next.unpad_image` (and the processor's
    `_get_unpadded_features`): compare aspect ratios as floats; on the padded axis the image
    spans `int(round(H * (cols / W), 7))` cells (the division happens first, then the product,
    then rounding to 7 decimals, then truncation) and only the floored half of the leftover is
    cut from EACH side, so an odd leftover keeps one extra row/column at the end.
    """
    height, width = _check_hw(image_hw)
    if rows < 1 or cols < 1:
        raise ValueError(f"feature grid must be at least 1x1, got rows={rows}, cols={cols}")
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = int(round(width * (rows / height), 7))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def anyres_num_tokens(image_hw: Sequence[int], pinpoints, tile: int, patch: int, base_tokens: int) -> int:
    """Image tokens one anyres image expands to in the prompt.

    `base_tokens` (576 for CLIP-336 with CLS dropped) for the whole-image tile (no newlines),
    then the unpadded grid of kept_rows x kept_cols features plus one newline per kept row.
    Equals transformers' `LlavaNextProcessor._get_number_of_features` (minus 1 for the CLS that
    the "default" strategy drops, which `base_tokens` already excludes).
    """
    if tile % patch:
        raise ValueError(f"tile size {tile} is not a multiple of the vision patch size {patch}")
    grid_rows, grid_cols = anyres_grid(image_hw, pinpoints, tile)
    per_side = tile // patch
    top, bottom, left, right = unpad_window(image_hw, grid_rows * per_side, grid_cols * per_side)
    kept_rows, kept_cols = bottom - top, right - left
    return base_tokens + kept_rows * kept_cols + kept_rows
