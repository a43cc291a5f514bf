"""resample.resize_torch (the GPU path's integer passes, run here on the CPU) vs Pillow's own
Image.resize: bit-identical over every filter, odd / 1-pixel / extreme-aspect sizes, upscales,
downscales, one-axis resizes and both pass orders (Pillow >= 13 runs the vertical pass first when
the height shrinks much more than the width)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava.preprocess.resample import coefficients, resize_pil, resize_torch, vertical_first

FILTERS = [0, 1, 2, 3, 4, 5]    # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
# (w, h) sources and (w, h) targets: 1-pixel sides, odd sizes, extreme aspect ratios, big
# downscale factors (wide filters) and upscales.
SOURCES = [(1, 1), (1, 7), (9, 1), (2, 3), (13, 29), (57, 55), (101, 203), (333, 77), (5, 400), (640, 480)]
TARGETS = [(1, 1), (1, 5), (4, 1), (3, 2), (56, 56), (57, 111), (111, 57), (336, 336), (672, 504), (7, 300)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def check(img: Image.Image, w: int, h: int, resample: int) -> None:
    ref = np.asarray(img.resize((w, h), resample))
    ref = ref if ref.ndim == 3 else ref[..., None]
    x = torch.from_numpy(np.array(img)).reshape(img.height, img.width, -1)[None]
    ours = resize_torch(x, (h, w), resample)[0].numpy()
    assert ours.shape == ref.shape, (img.size, (w, h), resample, ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        where = np.argwhere(ours != ref)
        i = tuple(where[0])
        raise AssertionError(f"{img.mode} {img.size} -> {(w, h)} filter {resample}: {len(where)} values "
                             f"differ; first at {i}: ours {ours[i]} vs Pillow {ref[i]}")
    assert np.array_equal(resize_pil(img, (h, w), resample), ref)


@pytest.mark.parametrize("resample", FILTERS)
def test_every_filter_matches_pillow(resample):
    for n, (sw, sh) in enumerate(SOURCES):
        img = noise(sw, sh, seed=n)
        for tw, th in TARGETS + [(sw, 3), (5, sh), (2 * sw + 1, sh), (sw, 2 * sh + 1)]:  # + one-axis
            check(img, tw, th, resample)


def test_one_axis_and_grayscale():
    img = noise(75, 100, seed=3)
    for size in [(75, 40), (75, 333), (20, 100), (300, 100), (75, 100)]:
        check(img, *size, 3)
    check(noise(75, 100, "L", seed=4), 31, 17, 3)


def test_pass_order_boundary_matches_pillow():
    """Around `in_h - out_h == 2 * (in_w - out_w)`, where Pillow 13 switches the pass order; a wrong
    order changes many pixels (the intermediate is rounded to uint8)."""
    rng = random.Random(7)
    flipped = 0
    for n in range(120):
        w, h = rng.randint(3, 300), rng.randint(3, 300)
        tw = rng.randint(1, w)
        for dh in (2 * (w - tw) - 1, 2 * (w - tw), 2 * (w - tw) + 1):
            if 0 < dh < h:
                flipped += vertical_first((h, w), (h - dh, tw))
                check(noise(w, h, seed=n), tw, h - dh, 3)
    assert flipped > 20, "the sweep never exercised the vertical-first order"


def test_upscale_and_downscale_photos():
    for (sw, sh), (tw, th) in [((1024, 768), (672, 504)), ((1024, 768), (336, 336)),
                               ((768, 1024), (504, 672)), ((2000, 1500), (336, 336)), ((200, 150), (1008, 336))]:
        check(noise(sw, sh, seed=sw), tw, th, 3)


def test_coefficients_are_pillow_fixed_point():
    """Each output's weights sum to ~1 in 22-bit fixed point and only reach in-range taps."""
    for in_size, out_size in [(1, 1), (7, 3), (4000, 336), (336, 1008), (101, 64)]:
        index, weight = coefficients(in_size, out_size, 3)
        assert index.min() >= 0 and index.max() < in_size, (in_size, out_size)
        sums = weight.astype(np.int64).sum(1)
        assert np.all(np.abs(sums - (1 << 22)) <= weight.shape[1]), (in_size, out_size, sums[:5])


def test_bad_filter_is_rejected():
    with pytest.raises(ValueError, match="0..5"):
        resize_torch(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), (1, 1), 9)
