"""PIL's uint8 resampler (`Image.resize` on an RGB image), bit for bit, on any torch device.

Pillow (src/libImaging/Resample.c, `ImagingResampleInner`) resizes in two separable passes, each
skipped when its size does not change, rounding and clipping to uint8 in between: horizontal
first, unless the height shrinks much more than the width (`vertical_first`). Each pass, per
output pixel `i`:

    out[i] = clip8((1 << 21) + sum_t in[xmin_i + t] * k_i[t]) >> 22)

with int32 coefficients `k_i` computed once per (in size, out size, filter) on the host, exactly
as `precompute_coeffs` + `normalize_coeffs_8bpc` do: the filter (bicubic a = -0.5, bilinear, box,
hamming, lanczos) is evaluated in double precision at `(t + xmin - center + 0.5) / filterscale`,
with its support stretched by the downscale factor, normalized by the sequential sum of the
weights, and converted to fixed point with 22 fraction bits, rounding half away from zero
(`(int)(k * 2**22 +- 0.5)`). numpy's float64 +, -, *, / are the same IEEE operations as C's, so
the coefficients are identical; the transcendental filters (hamming, lanczos) go through
Python's `math` (the same libm as Pillow), never numpy's own vectorized sin/cos.

`resize_torch` gathers the taps and multiply-adds them in int32 on the tensor's device (the
GPU path). On a CPU, Pillow's fused C loop is itself the fastest exact implementation (torch's
eager gather/multiply/sum is ~10x slower there, and a torch.compile'd loop ~20x), so the CPU path
calls `resize_pil`; the two agree bit for bit (tests/test_resample.py).
NEAREST (filter 0) is an index map Pillow computes in fixed point; the torch backend takes the
map from Pillow itself (a 1-row int32 image of indices, resized) and gathers with it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch
from PIL import Image

__all__ = ["coefficients", "window_span", "resize_torch", "resize_pil"]

PRECISION_BITS = 32 - 8 - 2
_F32 = float(np.float32(0.54)), float(np.float32(0.46))   # Pillow's hamming uses float literals


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _hamming1(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F32[0] + _F32[1] * math.cos(x))


def _lanczos1(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


def _scalar(fn):
    return lambda x: np.array([fn(float(v)) for v in x.ravel()], dtype=np.float64).reshape(x.shape)


# PIL filter id -> (filter, support); ids as PIL.Image.Resampling.
_FILTERS = {1: (_scalar(_lanczos1), 3.0), 2: (_bilinear, 1.0), 3: (_bicubic, 2.0), 4: (_box, 0.5),
            5: (_scalar(_hamming1), 1.0)}


@functools.lru_cache(maxsize=512)
def coefficients(in_size: int, out_size: int, resample: int,
                 span: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 [out, K], weight int32 [out, K]) of one pass, as Pillow computes them.

    Row i reads `in[index[i, t]] * weight[i, t]` for t < K; taps past Pillow's `xmax` repeat the
    first index with weight 0. NEAREST: K = 1, weight 1 (no rounding term needed, see `_pass`).
    span: the (in0, in1) side of `resize(box=...)` (C floats; default the whole input).
    """
    if resample == 0 and span is None:
        ramp = Image.fromarray(np.arange(in_size, dtype=np.int32)[None, :], mode="I")
        index = np.asarray(ramp.resize((out_size, 1), Image.Resampling.NEAREST), dtype=np.int64)
        return index.reshape(out_size, 1), np.ones((out_size, 1), np.int32)
    if resample == 0:
        raise ValueError("coefficients: no span for NEAREST (its index map comes from Pillow itself)")
    fn, base_support = _FILTERS[resample]
    in0, in1 = (np.float32(0), np.float32(in_size)) if span is None else (np.float32(v) for v in span)
    scale = float(in1 - in0) / out_size         # the box is C floats, subtracted as floats
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = float(in0) + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)   # (int) truncates to zero
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    count = xmax - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    inv_filterscale = 1.0 / filterscale         # C multiplies by the reciprocal
    k = np.where(valid, fn(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * inv_filterscale), 0.0)
    ww = np.zeros(out_size)
    for t in range(ksize):                      # sequential sum, as C (numpy's sum is pairwise)
        ww = ww + k[:, t]
    k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
    fixed = k * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(k < 0, fixed - 0.5, fixed + 0.5)).astype(np.int32)
    index = np.where(valid, xmin[:, None] + taps[None, :], xmin[:, None])
    return index, fixed


def window_span(in_size: int, out_size: int, lo: int, hi: int, resample: int) -> tuple[float, float] | None:
    """A `resize(box=...)` side (in0, in1) whose hi - lo outputs are exactly outputs lo..hi of
    the whole in_size -> out_size pass, or None when no such box reproduces them.

    The natural box `lo * in / out, hi * in / out` maps the same centres in exact arithmetic,
    but Pillow computes them in floats (`in0 + (i + 0.5) * scale`), so the fixed-point tables
    are compared before the box is trusted (for 4000 -> 448 columns 56..392 they match).
    """
    if resample == 0 or (lo, hi) == (0, out_size):
        return None
    in0, in1 = float(np.float32(lo * in_size / out_size)), float(np.float32(hi * in_size / out_size))
    if not 0 <= in0 < in1 <= in_size:
        return None
    whole = coefficients(in_size, out_size, resample)
    part = coefficients(in_size, hi - lo, resample, (in0, in1))
    same = all(w[lo:hi].shape == p.shape and np.array_equal(w[lo:hi], p) for w, p in zip(whole, part))
    return (in0, in1) if same else None


# ---- torch backend ------------------------------------------------------------------------------

_CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 29}


@functools.lru_cache(maxsize=256)
def _device_coefficients(in_size: int, out_size: int, resample: int, device: torch.device):
    """`coefficients` as tensors on `device`, uploaded once per (sizes, filter, device)."""
    index, weight = coefficients(in_size, out_size, resample)
    out = torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device)
    if device.type == "cuda":   # cached for every stream: the upload must be complete, not queued
        torch.cuda.current_stream(device).synchronize()
    return out


def _pass(x: torch.Tensor, in_size: int, out_size: int, resample: int) -> torch.Tensor:
    """uint8 [A, in_size, B] -> uint8 [A, out_size, B] along dim 1 (one Pillow pass)."""
    index, weight = _device_coefficients(in_size, out_size, resample, x.device)
    if resample == 0:
        return x.index_select(1, index[:, 0])
    a, _, b = x.shape
    k = index.shape[1]
    step = max(1, _CHUNK_BYTES.get(x.device.type, 1 << 28) // max(1, a * k * b * 4))
    out = torch.empty((a, out_size, b), dtype=torch.uint8, device=x.device)
    for lo in range(0, out_size, step):
        hi = min(out_size, lo + step)
        taps = x[:, index[lo:hi]].to(torch.int32)                   # [A, o, K, B]
        acc = (taps * weight[lo:hi, :, None]).sum(2, dtype=torch.int32) + (1 << (PRECISION_BITS - 1))
        # clip8: arithmetic shift (floor), then clamp into uint8
        out[:, lo:hi] = (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)
    return out


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether Pillow runs the vertical pass first (only matters when both passes run).

    Pillow >= 13 (python-pillow/Pillow#9549) resizes vertically first when the height shrinks by
    more than twice as many pixels as the width does: `out_h < in_h and in_h - out_h >
    2 * (in_w - out_w)` (fitted to Pillow 13.0's output over random sizes, boundaries included:
    tests/test_resample.py). Older Pillow always runs the horizontal pass first.
    """
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return _PILLOW_MAJOR >= 13 and out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def resize_torch(x: torch.Tensor, size_hw: tuple[int, int], resample: int) -> torch.Tensor:
    """uint8 [N, H, W, C] -> [N, h, w, C] on x's device: every image as `Image.resize((w, h))`."""
    if resample not in range(6):
        raise ValueError(f"resample must be a PIL filter id 0..5, got {resample!r}")
    n, h, w, c = x.shape
    out_h, out_w = size_hw
    if out_h != h and vertical_first((h, w), (out_h, out_w)):
        x = _pass(x.reshape(n, h, w * c), h, out_h, resample).view(n, out_h, w, c)
        h = out_h
    if out_w != w:
        x = _pass(x.reshape(n * h, w, c), w, out_w, resample).view(n, h, out_w, c)
    if out_h != h:
        x = _pass(x.reshape(n, h, out_w * c), h, out_h, resample).view(n, out_h, out_w, c)
    return x


def resize_pil(img: Image.Image | np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow's own `resize((w, h))` (the reference; the CPU path): HWC uint8 [h, w, C]."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    out = np.asarray(img.resize(size_hw[::-1], resample))
    return out if out.ndim == 3 else out[..., None]
