"""Pillow's resize split into bands that run on all cores, bit for bit `Image.resize`.

Pillow resamples in two separable passes with uint8 rounding in between (`resample.py`): a
horizontal pass maps every row on its own (its coefficients depend only on the width mapping),
and a vertical pass maps every column on its own (only the height mapping). So the rows of a
horizontal pass and the columns of a vertical pass can be cut into bands, each band resized by
Pillow on one axis only (`crop(band).resize` with the other side unchanged runs exactly that one
pass), and the bands pasted back: the same integers in the same order, in Pillow's pass order
(`vertical_first`). Pillow releases the GIL while it resamples, crops and pastes, so the bands
run in parallel on plain threads; each stays single-threaded, which holds up when other
processes share the cores (torch's OpenMP kernels do not).

Work is scheduled in stages: every first-pass band of every resize of an image is one task of
`run_tasks`; then every second-pass band. Any other job (e.g. the cache key) runs with the
first stage that would leave a thread idle, else with the last. Where the compiled passes load
(native.py), the resizes they can do go through them instead (native_resize.py): the same
bits, ~4x faster per core.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from fastllava.preprocess import native, native_resize
from fastllava.preprocess.resample import vertical_first, window_span
from fastllava.preprocess.tasks import even_spans, num_workers, run_tasks

__all__ = ["BandedResize", "resize_in_bands"]

# Below this many source pixels per band a thread hand-off costs more than the band's work.
MIN_BAND_PIXELS = 1 << 18
# Above this many source pixels per band the band's crop (4 bytes per pixel) is a fresh mapping
# whose page faults cost as much as the copy; smaller crops reuse freed heap memory.
MAX_BAND_PIXELS = 1 << 20


class BandedResize:
    """`img.resize((w, h), resample)` of an RGB or L PIL image, one pass at a time, in bands.

    `tasks()` gives the current pass's band tasks (none once done); `take(outputs)` pastes
    their outputs (in task order) into the next pass's input; `result()` is the HWC uint8
    array. `resize_in_bands` drives several resizes and other tasks stage by stage.

    window (top, left, h, w): only that part of the output is wanted (a center crop). A pass
    then computes just the wanted columns (rows) when a Pillow `box` reproduces exactly those
    outputs (`window_span`); the rest is cropped at the end.
    """

    def __init__(self, img: Image.Image, size_hw: tuple[int, int], resample: int,
                 window: tuple[int, int, int, int] | None = None):
        if img.mode not in ("RGB", "L"):
            raise ValueError(f"BandedResize takes RGB or L images, got mode {img.mode!r}")
        self.mode, self.resample = img.mode, resample
        out_h, out_w = size_hw
        top, left, win_h, win_w = window or (0, 0, out_h, out_w)
        # per pass: (axis, output size, box side or None, the window's offset left after it)
        # "h": the width changes (a horizontal pass over rows); "v": the height (over columns)
        self.passes = []
        for axis, n_in, n_out, lo, n in (("h", img.width, out_w, left, win_w), ("v", img.height, out_h, top, win_h)):
            span = window_span(n_in, n_out, lo, lo + n, resample) if n_in != n_out else None
            if n_in != n_out:
                self.passes.append((axis, n if span else n_out, span))
            if axis == "h":
                self.left = 0 if span else left
            else:
                self.top = 0 if span else top
        if len(self.passes) == 2 and vertical_first((img.height, img.width), size_hw):
            self.passes.reverse()
        self.win_hw = (win_h, win_w)
        self.bands = 2 * num_workers()   # more bands than threads: they balance
        self.stage = img                 # the input of the next pass
        self.spans: list[tuple[int, int]] = []

    def tasks(self) -> list:
        if not self.passes:
            return []
        img, (axis, size, span) = self.stage, self.passes[0]
        along = img.height if axis == "h" else img.width        # rows or columns to split
        pixels = img.width * img.height
        parts = max(1, min(max(self.bands, -(-pixels // MAX_BAND_PIXELS)), pixels // MIN_BAND_PIXELS, along))
        self.spans = even_spans(along, parts)
        return [functools.partial(self._band, img, axis, size, span, lo, hi) for lo, hi in self.spans]

    def take(self, outputs: list) -> None:
        axis = self.passes.pop(0)[0]
        if len(outputs) == 1:
            self.stage = outputs[0]
            return
        w = outputs[0].width if axis == "h" else sum(b.width for b in outputs)
        h = outputs[0].height if axis == "v" else sum(b.height for b in outputs)
        self.stage = Image.new(self.mode, (w, h))
        for (lo, _), band in zip(self.spans, outputs):
            self.stage.paste(band, (0, lo) if axis == "h" else (lo, 0))

    def results(self) -> list[np.ndarray]:
        """[result()]: the interface resize_in_bands shares with native_resize.NativeResizes."""
        return [self.result()]

    def result(self) -> np.ndarray:
        if self.passes:
            raise RuntimeError("BandedResize.result before every pass ran")
        (h, w), top, left = self.win_hw, self.top, self.left
        out = self.stage
        if (top, left, h, w) != (0, 0, out.height, out.width):
            out = out.crop((left, top, left + w, top + h))
        out = np.asarray(out)
        return out if out.ndim == 3 else out[..., None]

    def _band(self, img: Image.Image, axis: str, size: int, span, lo: int, hi: int) -> Image.Image:
        """One pass on rows (axis "h") or columns ("v") lo:hi. With the other side's size
        unchanged (and the box's other side the whole band), Pillow runs only this pass."""
        if axis == "h":
            band = img if (lo, hi) == (0, img.height) else img.crop((0, lo, img.width, hi))
            box = None if span is None else (span[0], 0, span[1], hi - lo)
            return band.resize((size, hi - lo), self.resample, box)
        band = img if (lo, hi) == (0, img.width) else img.crop((lo, 0, hi, img.height))
        box = None if span is None else (0, span[0], hi - lo, span[1])
        return band.resize((hi - lo, size), self.resample, box)


def resize_in_bands(jobs: list[tuple], resample: int, extra: list = ()) -> tuple[list[np.ndarray], list]:
    """Every (image, (h, w)[, window]) job resized as Pillow would (HWC uint8 arrays, cut to
    the window), and the results of the `extra` tasks (e.g. the cache key).

    Jobs the compiled passes can do (native_resize.can_take, when native.passes() loaded) run
    there, grouped by source image; the others through Pillow in bands (BandedResize). The
    extra tasks go first in the compiled passes' first stage when there is one (it holds most of
    the work); else in the first stage with fewer bands than threads (else idle), else the last.
    """
    takeable = [i for i, job in enumerate(jobs) if native_resize.can_take(job[0], job[1], resample)]
    lib = native.passes() if takeable else None
    groups: dict[int, list[int]] = {}
    for i in takeable if lib is not None else []:
        groups.setdefault(id(jobs[i][0]), []).append(i)
    units, slots = [], []          # a unit's results go to these job indices
    for idx in groups.values():
        units.append(native_resize.NativeResizes(lib, jobs[idx[0]][0], [
            (jobs[i][1], jobs[i][2] if len(jobs[i]) > 2 else None) for i in idx], resample))
        slots.append(idx)
    native_ids = {i for idx in groups.values() for i in idx}
    for i, job in enumerate(jobs):
        if i not in native_ids:
            units.append(BandedResize(*job[:2], resample, *job[2:]))
            slots.append([i])
    extra_out, pending = None, list(extra)
    while True:
        stage = [u.tasks() for u in units]
        bands = [t for ts in stage for t in ts]
        last = all(len(u.passes) <= 1 for u in units)
        first = pending if pending and (groups or last or len(bands) < num_workers()) else []
        todo = first + bands
        if not todo:
            break
        out = run_tasks(todo)
        if first:
            extra_out, out, pending = out[:len(first)], out[len(first):], []
        for u, ts in zip(units, stage):
            if ts:
                u.take(out[:len(ts)])
                out = out[len(ts):]
    results: list = [None] * len(jobs)
    for u, idx in zip(units, slots):
        for i, r in zip(idx, u.results()):
            results[i] = r
    return results, extra_out or []
