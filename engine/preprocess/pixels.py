"""The pixel pipeline of `preprocess`: geometry on uint8 arrays, then one table lookup.

Every step reproduces what transformers' PIL processors do to the uint8 image (llava-reference.md
§4), on a batch of NHWC uint8 arrays:
- resize: Pillow's resampler (`resample.py`): Pillow itself on the CPU, the source's resizes
  cut into bands on all cores (`bands.py`); exact int32 passes in torch on a GPU;
- pad (anyres canvas, black; LLaVA-1.5 "pad" mode, the mean colour) and tile: array copies;
- center crop (`image_transforms.center_crop`, zero-padded when the image is smaller);
- rescale + normalize: the per-channel float32 table of `normalize_table`, gathered into NCHW.
The CPU path stays in numpy (torch's multi-threaded CPU kernels lose to numpy on these small,
memory-bound copies when cores are shared); the device path is the same steps in torch.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from PIL import Image

from fastllava.preprocess.bands import resize_in_bands
from fastllava.preprocess.tasks import even_spans, num_workers, run_tasks
from fastllava.preprocess.resample import resize_pil, resize_torch

__all__ = ["NumpyPixels", "TorchPixels", "shortest_edge_size", "center_crop", "pad_into"]


class NumpyPixels:
    """CPU: numpy arrays, Pillow-exact resizes. The resizes of the source (anyres: grid and
    base, each reading the whole image) run as bands on all cores together with the cache key's
    tasks (`key_parts`: identity.key_tasks' (tasks, finish); the key also reads every pixel);
    `key()` runs them here if no source resize did."""

    def __init__(self, key_parts):
        self._key_parts, self._key = key_parts, None

    def key(self) -> bytes:
        if self._key is None:
            tasks, finish = self._key_parts
            self._key = finish(run_tasks(tasks))
        return self._key

    def resize_source(self, img: Image.Image, sizes, resample, windows=None) -> list[np.ndarray]:
        """The RGB source resized to each (h, w) in sizes (then cut to its (top, left, h, w)
        window, if given, as `center_crop` would): NHWC arrays."""
        extra = self._key_parts[0] if self._key is None else []
        jobs = [(img, s, w) for s, w in zip(sizes, windows or [None] * len(sizes))]
        outs, done = resize_in_bands(jobs, resample, extra)
        if extra:
            self._key = self._key_parts[1](done)
        return [o[None] for o in outs]

    def source(self, rgb: Image.Image, pixels: np.ndarray | None):
        return rgb

    def context(self):
        return contextlib.nullcontext()

    def done(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def full(self, shape, fill) -> np.ndarray:
        out = np.empty(shape, np.uint8)
        out[...] = np.asarray(fill, np.uint8)
        return out

    def resize(self, x: np.ndarray, size_hw, resample) -> np.ndarray:
        """NHWC array -> NHWC array."""
        if x.shape[1:3] == tuple(size_hw):
            return x
        return np.stack([resize_pil(i, size_hw, resample) for i in x])

    def to_array(self, x) -> np.ndarray:
        return np.asarray(x)[None] if isinstance(x, Image.Image) else x

    def permute(self, x, dims):
        return x.transpose(dims)

    def cat(self, xs) -> list[np.ndarray]:
        """Kept as a list: `normalize` writes each part into its slice of the output, so the
        uint8 parts are never copied together."""
        return list(xs)

    def normalize(self, x: np.ndarray | list[np.ndarray], table: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 (or a list of NHWC parts, as `cat` leaves them) -> float32 NCHW table[c, x].

        The lookups run as row bands on all cores (`run_tasks`; numpy's take releases the GIL):
        after the resizes they are the largest step left, ~2.5 ms for the five anyres tiles."""
        parts = [x] if isinstance(x, np.ndarray) else x
        _, h, w, c = parts[0].shape
        images = [img for part in parts for img in part]        # HWC views, any strides
        out = np.empty((len(images), c, h, w), np.float32)
        table = table.numpy()

        def lookup(i: int, lo: int, hi: int) -> None:
            for ch in range(c):
                np.take(table[ch], images[i][lo:hi, :, ch], out=out[i, ch, lo:hi])

        per_image = max(1, -(-2 * num_workers() // max(1, len(images))))     # ~2 bands per thread
        run_tasks([functools.partial(lookup, i, lo, hi) for i in range(len(images))
                   for lo, hi in even_spans(h, per_image)])
        return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


class TorchPixels:
    """Any torch device (the GPU path): the source goes to the device once as uint8.

    On CUDA the work runs on a side stream, so an image is preprocessed while the engine's
    forward pass occupies the default stream; `done` waits for that stream only and hands the
    result over to the default stream (where the vision tower reads it)."""

    def __init__(self, device: torch.device, key: bytes):
        self.device, self._key = device, key
        self.stream = _side_stream(device) if device.type == "cuda" else None

    def key(self) -> bytes:
        return self._key

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def done(self, out: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            self.stream.synchronize()
            out.record_stream(torch.cuda.default_stream(self.device))  # freed later on that stream
        return out

    def source(self, rgb: Image.Image, pixels: np.ndarray) -> torch.Tensor:
        # `pixels`: an HWC view of `rgbx_pixels` (the key's array), copied on the way to the
        # device (no pin_memory: allocating pinned memory per image costs more than the staged copy).
        return torch.from_numpy(pixels).to(self.device).contiguous()[None]

    def full(self, shape, fill) -> torch.Tensor:
        fill = torch.tensor(fill, dtype=torch.uint8, device=self.device)
        return fill.expand(*shape).clone()

    def resize(self, x, size_hw, resample) -> torch.Tensor:
        return resize_torch(x, size_hw, resample)

    def resize_source(self, x, sizes, resample, windows=None) -> list[torch.Tensor]:
        outs = [self.resize(x, s, resample) for s in sizes]    # asynchronous on a GPU stream
        return [o if w is None else o[:, w[0]:w[0] + w[2], w[1]:w[1] + w[3]]
                for o, w in zip(outs, windows or [None] * len(sizes))]

    def to_array(self, x):
        return x

    def permute(self, x, dims):
        return x.permute(*dims)

    def cat(self, xs):
        return torch.cat(xs)

    def normalize(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        offsets = torch.arange(c, device=self.device, dtype=torch.int64) * table.shape[1]
        flat = x.permute(0, 3, 1, 2).to(torch.int64) + offsets.view(1, c, 1, 1)
        return table.to(self.device).reshape(-1)[flat]


def shortest_edge_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
    becomes `shortest_edge`, the long side `int(shortest_edge * long / short)` (truncated)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if w <= h else (shortest_edge, new_long)


def center_crop(px, x, crop_h: int, crop_w: int):
    """NHWC [n, h, w, c] -> [n, crop_h, crop_w, c], as `image_transforms.center_crop`.

    Offset `(h - crop_h) // 2`; an image smaller than the crop is first placed on a zero canvas
    at `ceil(slack / 2)` (the odd pixel goes top/left here, unlike the anyres padding)."""
    n, h, w, c = x.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    canvas = pad_into(px, x, (new_h, new_w), (pad_top, pad_left), 0)
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def pad_into(px, x, canvas_hw: tuple[int, int], top_left: tuple[int, int], fill):
    """NHWC x placed at top_left on a canvas of canvas_hw filled with `fill` (int or RGB)."""
    n, h, w, c = x.shape
    top, left = top_left
    canvas = px.full((n, *canvas_hw, c), fill)
    canvas[:, top:top + h, left:left + w] = x
    return canvas
