"""bands.py: Pillow's resize cut into row / column bands on threads, vs Pillow's own Image.resize:
bit-identical over every filter, both pass orders, one-axis resizes, up- and downscales, big
downscale factors, and output windows (the part a center crop keeps, resized through a Pillow box
only where `window_span` proves the box gives the same coefficients). Every test runs with the
compiled passes taking the resizes they can (native_resize.py) and with Pillow doing all."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from PIL import Image

from fastllava.preprocess import native
from fastllava.preprocess.bands import BandedResize, resize_in_bands
from fastllava.preprocess.tasks import run_tasks
from fastllava.preprocess.resample import vertical_first, window_span

FILTERS = [0, 1, 2, 3, 4, 5]    # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@pytest.fixture(autouse=True, params=["compiled", "pillow"])
def resize_path(request, monkeypatch):
    """Every test twice: with the compiled passes (native_resize.py) taking what they can, and
    with Pillow in bands doing everything (as on a machine without a C compiler)."""
    if request.param == "pillow":
        monkeypatch.setattr(native, "passes", lambda: None)
    elif native.passes() is None:
        pytest.skip("the compiled resample passes did not build here (no C compiler?)")
    return request.param


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def check(img: Image.Image, w: int, h: int, resample: int, window=None) -> None:
    ref = np.asarray(img.resize((w, h), resample))
    ref = ref if ref.ndim == 3 else ref[..., None]
    if window is not None:
        top, left, wh, ww = window
        ref = ref[top:top + wh, left:left + ww]
    (ours,), _ = resize_in_bands([(img, (h, w), window)], resample)
    assert ours.shape == ref.shape, (img.size, (w, h), resample, window, ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        where = np.argwhere(ours != ref)
        raise AssertionError(f"{img.mode} {img.size} -> {(w, h)} filter {resample} window {window}: "
                             f"{len(where)} values differ; first at {tuple(where[0])}")


@pytest.mark.parametrize("resample", FILTERS)
def test_every_filter_matches_pillow(resample):
    """Large enough to be cut into several bands (>= 2**18 source pixels per band)."""
    for n, ((sw, sh), (tw, th)) in enumerate([((1600, 1200), (336, 336)), ((1200, 1600), (448, 336)),
                                              ((2000, 700), (672, 504)), ((900, 900), (900, 300)),
                                              ((900, 900), (250, 900)), ((700, 800), (1008, 1344)),
                                              ((3000, 200), (40, 100)), ((200, 3000), (100, 40))]):
        check(noise(sw, sh, seed=n), tw, th, resample)


def test_both_pass_orders_and_grayscale():
    img = noise(300, 2400, seed=1)
    assert vertical_first((2400, 300), (200, 250)) and not vertical_first((2400, 300), (2000, 100))
    for size in [(250, 200), (100, 2000), (300, 1000), (30, 2400)]:
        check(img, *size, 3)
    check(noise(1500, 1100, "L", seed=2), 333, 211, 3)


def test_windows_match_a_crop_of_the_whole_resize():
    rng = random.Random(3)
    cases = [((4000, 3000), (448, 336), (0, 56, 336, 336)), ((3000, 4000), (336, 448), (56, 0, 336, 336)),
             ((1920, 1080), (597, 336), (0, 130, 336, 336)), ((1024, 768), (448, 336), (0, 56, 336, 336))]
    for _ in range(25):
        w, h, tw, th = rng.randint(1, 1300), rng.randint(1, 1300), rng.randint(1, 700), rng.randint(1, 700)
        top, left = rng.randint(0, th - 1), rng.randint(0, tw - 1)
        cases.append(((w, h), (tw, th), (top, left, rng.randint(1, th - top), rng.randint(1, tw - left))))
    for n, ((w, h), (tw, th), window) in enumerate(cases):
        img = noise(w, h, seed=n)
        for resample in (3, 2, 1, 0):
            check(img, tw, th, resample, window)


def test_window_span_is_proved_by_pillow_box():
    """Where window_span offers a box, Pillow's resize through it gives exactly the window of the
    whole resize; the 336 px center crop of a 4:3 photo gets one (that is the saving)."""
    rng = random.Random(5)
    found = 0
    cases = [(4000, 448, 56, 392), (1024, 448, 56, 392), (4032, 448, 56, 392), (2000, 500, 100, 400)]
    for _ in range(300):
        n_in, n_out = rng.randint(2, 5000), rng.randint(1, 700)
        lo = rng.randint(0, n_out - 1)
        cases.append((n_in, n_out, lo, rng.randint(lo + 1, n_out)))
    for n_in, n_out, lo, hi in cases:
        span = window_span(n_in, n_out, lo, hi, 3)
        if span is None:
            continue
        found += 1
        img = noise(n_in, 2, seed=n_in)
        whole = np.asarray(img.resize((n_out, 2), 3))[:, lo:hi]
        part = np.asarray(img.resize((hi - lo, 2), 3, box=(span[0], 0, span[1], 2)))
        assert np.array_equal(whole, part), (n_in, n_out, lo, hi, span)
    assert found > 10, "the sweep never found a usable box"
    assert window_span(4000, 448, 56, 392, 3) == (500.0, 3500.0)
    assert window_span(100, 50, 0, 50, 3) is None and window_span(100, 50, 5, 9, 0) is None


def test_one_pass_resizes_and_no_resize():
    img = noise(1200, 900, seed=4)
    assert len(BandedResize(img, (900, 300), 3).tasks()) > 1          # width only: row bands
    r = BandedResize(img, (900, 1200), 3)
    assert r.tasks() == [] and np.array_equal(r.result(), np.asarray(img))
    with pytest.raises(ValueError, match="RGB or L"):
        BandedResize(img.convert("RGBA"), (10, 10), 3)


def test_run_tasks_keeps_order_runs_everything_and_raises():
    seen = []
    lock = threading.Lock()

    def task(i):
        with lock:
            seen.append(i)
        return i * i

    assert run_tasks([lambda i=i: task(i) for i in range(9)]) == [i * i for i in range(9)]
    assert sorted(seen) == list(range(9)) and run_tasks([]) == []

    def boom():
        raise ValueError("band failed")

    with pytest.raises(ValueError, match="band failed"):
        run_tasks([lambda: 1, boom, lambda: 2])


def test_run_tasks_does_not_wait_for_a_busy_pool():
    """Another image's long task holds the pool: this call's tasks all run on the calling thread
    and it returns without waiting for the pool."""
    from fastllava.preprocess.tasks import _pool, num_workers

    if num_workers() < 2:
        pytest.skip("one core: no pool")
    release = threading.Event()
    busy = [_pool().submit(release.wait, 10) for _ in range(num_workers() - 1)]
    try:
        assert run_tasks([lambda i=i: i for i in range(5)]) == list(range(5))
        assert not any(f.done() for f in busy), "the pool finished early: the check proved nothing"
    finally:
        release.set()
    assert all(f.result() for f in busy)


@pytest.mark.parametrize("sizes", [[], [(768, 1024)], [(768, 300)], [(336, 448), (336, 336)],
                                   [(2000, 1500)]])
def test_extra_tasks_run_once_with_any_number_of_stages(sizes):
    """The cache key rides along with whichever stage has room: no resize at all (no stage), a
    no-op resize, one pass, two passes for two resizes, an upscale. Each extra task runs exactly
    once and its result comes back in order; the resizes are still Pillow's."""
    img = noise(1024, 768, seed=7)
    calls = []
    extra = [lambda i=i: calls.append(i) or f"extra{i}" for i in range(2)]
    outs, done = resize_in_bands([(img, s) for s in sizes], 3, extra)
    assert done == ["extra0", "extra1"] and sorted(calls) == [0, 1]
    for (h, w), out in zip(sizes, outs):
        assert np.array_equal(out, np.asarray(img.resize((w, h), 3)))


def test_numpy_normalize_of_strided_parts_equals_one_array():
    """`NumpyPixels.cat` keeps the parts apart and `normalize` looks each one up in row bands:
    the same floats as one lookup over the concatenated batch, for strided (tile) views too."""
    import torch

    from fastllava.preprocess.pixels import NumpyPixels

    rng = np.random.default_rng(3)
    canvas = rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    tiles = canvas.reshape(2, 32, 3, 32, 3).transpose(0, 2, 1, 3, 4).reshape(6, 32, 32, 3)
    base = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)[:, :, ::-1]   # negative stride
    table = torch.randn(3, 256)
    px = NumpyPixels(key_parts=None)
    got = px.normalize(px.cat([base, canvas[:, :32, :32], tiles]), table)
    whole = np.concatenate([base, canvas[:, :32, :32], tiles])
    want = table[torch.arange(3)[None, :, None, None], torch.from_numpy(whole).permute(0, 3, 1, 2).long()]
    assert got.shape == (8, 3, 32, 32) and torch.equal(got, want)
