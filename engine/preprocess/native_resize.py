"""Resizes of one RGB source through the compiled passes (native.py), in bands on all cores.

Pillow's two passes, with Pillow's own coefficients (resample.coefficients) and its integer
arithmetic (resample_passes.c), ~4x faster per core than Pillow's loop with AVX-512:
- stage 1, horizontal: the source's rows in bands; a band copies its rows out of Pillow a few at
  a time into a small buffer (4-byte pixels, L2-sized) and runs every job's horizontal pass on
  them, so the source is read once for all the resizes (anyres: the grid and the base image);
- stage 2, vertical: each job's output rows in bands, written as 3-byte RGB.
A window (top, left, h, w) computes only those output columns in stage 1 and rows in stage 2,
from the whole pass's coefficients: the same integers as the whole resize, cut afterwards. Only
the input rows some output row reads are passed horizontally (as Pillow does).
`can_take` says which resizes go this way: RGB, filters 1..5 (NEAREST is an index map Pillow
computes its own way), both sides changing, horizontal pass first (Pillow 13 runs some strong
vertical shrinks vertical-first); the rest go through Pillow in bands (bands.BandedResize).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fastllava.preprocess.identity import paste_rgbx_rows
from fastllava.preprocess.resample import coefficients, vertical_first
from fastllava.preprocess.tasks import even_spans, num_workers

__all__ = ["NativeResizes", "can_take"]

CHUNK_BYTES = 1 << 19          # source rows copied out of Pillow per step (stay in L2)
MIN_BAND_BYTES = 1 << 20       # less work than this per band does not pay for a thread hand-off


def can_take(img: Image.Image, size_hw: tuple[int, int], resample: int) -> bool:
    h, w = size_hw
    return (img.mode == "RGB" and resample in (1, 2, 3, 4, 5) and w != img.width
            and h != img.height and not vertical_first((img.height, img.width), size_hw))


@functools.lru_cache(maxsize=256)
def _table(n_in: int, n_out: int, resample: int):
    """(first tap int32 [out], taps int32 [out], weights int32 [out, K], K) of one whole pass."""
    index, weight = coefficients(n_in, n_out, resample)
    K = weight.shape[1]
    taps = (index == index[:, :1] + np.arange(K)).sum(1)   # past Pillow's xmax: index = xmin
    return (np.ascontiguousarray(index[:, 0], dtype=np.int32),
            np.ascontiguousarray(taps, dtype=np.int32), np.ascontiguousarray(weight), K)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


@dataclass
class _Job:
    x: tuple                  # horizontal _table
    y: tuple                  # vertical _table
    top: int
    left: int
    rows: int                 # output window
    cols: int
    y_lo: int                 # input rows the window's output rows read
    y_hi: int
    mid: np.ndarray           # (source height, cols, 4): the horizontal pass's rows y_lo..y_hi
    out: np.ndarray           # (rows, cols, 3)


class NativeResizes:
    """Jobs ((h, w), window or None) of one RGB image; `tasks()`/`take()` stage by stage as
    bands.BandedResize, `results()` the HWC uint8 arrays in job order."""

    def __init__(self, lib, img: Image.Image, jobs: list[tuple], resample: int):
        self.lib, self.img = lib, img
        self.jobs = []
        for (h, w), window in jobs:
            top, left, rows, cols = window or (0, 0, h, w)
            x, y = _table(img.width, w, resample), _table(img.height, h, resample)
            y_lo = int(y[0][top])
            y_hi = int(max(y[0][top:top + rows] + y[1][top:top + rows]))
            self.jobs.append(_Job(x, y, top, left, rows, cols, y_lo, y_hi,
                                  np.empty((img.height, cols, 4), np.uint8),
                                  np.empty((rows, cols, 3), np.uint8)))
        self.passes = ["h", "v"] if self.jobs else []

    def tasks(self) -> list:
        if not self.passes:
            return []
        bands = 2 * num_workers()
        if self.passes[0] == "h":
            lo = min(j.y_lo for j in self.jobs)
            hi = max(j.y_hi for j in self.jobs)
            work = (hi - lo) * sum(j.cols * j.x[3] for j in self.jobs) * 4
            parts = max(1, min(bands, work // MIN_BAND_BYTES, hi - lo))
            return [functools.partial(self._horizontal, lo + a, lo + b)
                    for a, b in even_spans(hi - lo, parts)]
        out = []
        for j in self.jobs:
            parts = max(1, min(bands, j.rows * j.cols * j.y[3] * 4 // MIN_BAND_BYTES, j.rows))
            out += [functools.partial(self._vertical, j, a, b) for a, b in even_spans(j.rows, parts)]
        return out

    def take(self, outputs: list) -> None:
        self.passes.pop(0)        # the bands wrote their rows in place

    def results(self) -> list[np.ndarray]:
        if self.passes:
            raise RuntimeError("NativeResizes.results before both passes ran")
        return [j.out for j in self.jobs]

    def _horizontal(self, lo: int, hi: int) -> None:
        """Source rows lo..hi, a chunk at a time, through every job's horizontal pass."""
        width = self.img.width
        step = max(4, CHUNK_BYTES // (4 * width))
        buf = np.empty((min(step, hi - lo), width, 4), np.uint8)
        for r in range(lo, hi, step):
            n = min(step, hi - r)
            paste_rgbx_rows(self.img, buf[:n], r)
            for j in self.jobs:
                a, b = max(r, j.y_lo), min(r + n, j.y_hi)
                if a < b:
                    xmin, taps, weight, K = j.x
                    self.lib.hpass4(_ptr(buf[a - r:]), buf.strides[0], _ptr(j.mid[a:]),
                                    j.mid.strides[0], b - a, j.left, j.left + j.cols,
                                    _ptr(xmin), _ptr(taps), _ptr(weight), K)

    def _vertical(self, j: _Job, lo: int, hi: int) -> None:
        """Output rows lo..hi of job j's window."""
        ymin, taps, weight, K = j.y
        acc = np.empty(4 * j.cols, np.int32)
        self.lib.vpass4(_ptr(j.mid), j.mid.strides[0], _ptr(j.out[lo:]), j.out.strides[0],
                        j.top + lo, j.top + hi, j.cols, _ptr(ymin), _ptr(taps), _ptr(weight), K,
                        _ptr(acc))
