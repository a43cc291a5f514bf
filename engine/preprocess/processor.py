"""CLIP-style image preprocessing, bit-identical to transformers 5.23's PIL processors.

`preprocess(image, cfg, device)` reproduces `CLIPImageProcessorPil` (LLaVA-1.5: one tile) and
`LlavaNextImageProcessorPil` (LLaVA-NeXT anyres: base image + grid tiles) exactly
(llava-reference.md §4). Decoding and the mode conversion stay in PIL; the uint8 geometry runs
on the CPU (Pillow + numpy) or on the model's device (torch, `pixels.py`), bit for bit alike:

1. RGB: alpha (or a `transparency` key) is composited onto WHITE (`convert_to_rgb`).
2. Geometry on uint8: Pillow's resampler (bicubic by default; `resample.py` reproduces it in
   integer arithmetic), black padding, tiling, center crop (zero-padded when the image is
   smaller than the crop, as `image_transforms.center_crop`).
3. Rescale + normalize through a per-channel 256-entry float32 table built with transformers'
   exact dtypes: `float32(float64(v) * rescale_factor)`, then `(x - mean_f32) / std_f32` in
   float32 (a true division). Every output element is a table entry, so the table is exact.

The original LLaVA repo's v1.5 "pad" aspect mode (`pad_to_square`) is also here: transformers has
no such mode; it follows haotian-liu/LLaVA's `expand2square` (the image centred on a square of
the mean colour, the odd leftover bottom/right).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fastllava.checkpoint_files import read_json
from fastllava.preprocess.anyres import pad_offsets, resize_within, select_best_resolution
from fastllava.preprocess.identity import image_key, key_tasks, rgbx_pixels
from fastllava.preprocess.pixels import NumpyPixels, TorchPixels, center_crop, pad_into, shortest_edge_size

__all__ = ["ImageProcessorConfig", "ProcessedImage", "preprocess", "convert_to_rgb",
           "image_key", "rgbx_pixels", "normalize_table", "CLIP_MEAN", "CLIP_STD", "NEXT_PINPOINTS"]

# transformers' CLIPImageProcessor class defaults (used for fields a config file leaves out).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULTS = dict(size=224, crop=224, resample=3, rescale_factor=1 / 255)
# LlavaNextImageProcessor's default `image_grid_pinpoints` ((h, w) pairs).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image-processor settings that change pixels (one frozen value per checkpoint).

    pinpoints: anyres canvases as (h, w) pairs (None = LLaVA-1.5 single tile); tiles are
    crop_h x crop_h and every pinpoint must be a multiple of crop_h.
    pad_to_square: the original repo's v1.5 "pad" mode (not used by llava-hf configs).
    """

    shortest_edge: int
    crop_h: int
    crop_w: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_center_crop: bool = True
    do_convert_rgb: bool = True
    do_normalize: bool = True
    do_rescale: bool = True
    pinpoints: tuple[tuple[int, int], ...] | None = None
    pad_to_square: bool = False
    resize_hw: tuple[int, int] | None = None   # size {"height", "width"}: resize to exactly this

    def __post_init__(self):
        for name in ("shortest_edge", "crop_h", "crop_w"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ImageProcessorConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"ImageProcessorConfig.{name} needs 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"ImageProcessorConfig.image_std has a zero: {self.image_std}")
        if self.resample not in range(6):
            raise ValueError(f"ImageProcessorConfig.resample must be a PIL filter id 0..5, got {self.resample!r}")
        if self.pinpoints is not None:
            pins = tuple((int(h), int(w)) for h, w in self.pinpoints)
            bad = [p for p in pins if p[0] < self.crop_h or p[1] < self.crop_h
                   or p[0] % self.crop_h or p[1] % self.crop_h]
            if not pins or bad:
                raise ValueError(f"anyres pinpoints must be non-empty (h, w) multiples of the tile size "
                                 f"crop_h={self.crop_h}; bad: {bad or pins}")
            if self.resize_hw is not None:
                raise ValueError("an exact resize (size {'height', 'width'}) cannot be combined "
                                 "with anyres pinpoints")
            if self.pad_to_square:
                raise ValueError("pad_to_square (LLaVA-1.5 'pad' mode) cannot be combined with anyres pinpoints")
            object.__setattr__(self, "pinpoints", pins)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """expand2square's fill: `int(mean * 255)` per channel, (122, 116, 104) for CLIP."""
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def from_dir(cls, path, *, pinpoints=None, pad_to_square=False) -> "ImageProcessorConfig":
        """Read a checkpoint folder's image-processor settings, as transformers does.

        Source priority is transformers': the "image_processor" sub-dict of processor_config.json,
        else preprocessor_config.json (hub files, including the openai CLIP repo's format where
        `size`/`crop_size` may be plain ints). Missing fields take CLIPImageProcessor's defaults.
        `pinpoints` (e.g. the model config's image_grid_pinpoints) overrides the file's
        `image_grid_pinpoints`; a LlavaNextImageProcessor without them gets its class default.
        """
        folder = Path(path)
        d, source = _read_processor_dict(folder)
        where = f"{source} in {folder}"
        size = d.get("size", _DEFAULTS["size"])
        # {"height", "width"} resizes to exactly that size, aspect not kept (SiglipImageProcessor,
        # llava-interleave). SiglipImageProcessor's defaults: no center crop, mean/std 0.5.
        resize_hw = _parse_exact(size)
        shortest = resize_hw[0] if resize_hw else _parse_size(size, where)
        kind = str(d.get("image_processor_type", ""))
        siglip = kind.startswith("Siglip")
        mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
        if d.get("do_resize", True) is False:
            raise ValueError(f"{where}: do_resize=false is not supported")
        if pinpoints is None:
            pinpoints = d.get("image_grid_pinpoints")
            if pinpoints is None and str(d.get("image_processor_type", "")).startswith("LlavaNext"):
                pinpoints = NEXT_PINPOINTS
        do_center_crop = d.get("do_center_crop", not siglip)
        crop = {"height": resize_hw[0], "width": resize_hw[1]} if resize_hw else _DEFAULTS["crop"]
        crop_h, crop_w = _parse_crop(d.get("crop_size", crop), where)
        # LlavaImageProcessor (also what AutoImageProcessor picks for a llava folder that names no
        # type) pads to a square of the mean colour first when do_pad is set: the original repo's
        # "pad" mode. LlavaNext's do_pad only pads the tile batch; CLIP's has no such field.
        if pinpoints is None and d.get("do_pad") and (kind or "LlavaImageProcessor").startswith(
                "LlavaImageProcessor"):
            pad_to_square = True
        return cls(
            shortest_edge=shortest, crop_h=crop_h, crop_w=crop_w,
            image_mean=_triple(d.get("image_mean", mean), "image_mean", where),
            image_std=_triple(d.get("image_std", std), "image_std", where),
            resample=int(d.get("resample", _DEFAULTS["resample"])),
            rescale_factor=float(d.get("rescale_factor", _DEFAULTS["rescale_factor"])),
            do_center_crop=bool(do_center_crop), resize_hw=resize_hw,
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            pinpoints=None if pinpoints is None else tuple(tuple(p) for p in pinpoints),
            pad_to_square=pad_to_square,
        )


def _read_processor_dict(folder: Path) -> tuple[dict, str]:
    nested = folder / "processor_config.json"
    if nested.is_file():
        d = read_json(nested)
        if isinstance(d.get("image_processor"), dict):
            return d["image_processor"], nested.name
    flat = folder / "preprocessor_config.json"
    if flat.is_file():
        return read_json(flat), flat.name
    raise ValueError(f"no image processor settings in {folder}: expected processor_config.json "
                     "with an 'image_processor' entry, or preprocessor_config.json")


def _parse_exact(size) -> tuple[int, int] | None:
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return int(size["height"]), int(size["width"])
    return None


def _parse_size(size, where: str) -> int:
    # An int means "shortest edge" for CLIP-style processors (default_to_square=False).
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"])
    raise ValueError(f"{where}: unsupported size {size!r}; expected an int, {{'shortest_edge': n}} "
                     "or {'height': h, 'width': w}")


def _parse_crop(crop, where: str) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict) and {"height", "width"} <= set(crop):
        return int(crop["height"]), int(crop["width"])
    raise ValueError(f"{where}: unsupported crop_size {crop!r}; expected an int or {{'height', 'width'}}")


def _triple(value, name: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"{where}: {name} must be a number or 3 numbers, got {value!r}")


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image ready for the vision tower.

    pixel_values: float32 [num_tiles, 3, crop_h, crop_w]. LLaVA-1.5: 1 tile. Anyres: the whole
                  image resized to a square first, then the grid tiles row-major.
                  (With do_center_crop=False the tile size is whatever the resize gives, as in
                  transformers.)
    image_size:   (H, W) of the RGB image before any padding or resizing (transformers'
                  `image_sizes` entry; the anyres unpad uses it).
    grid:         anyres (grid_rows, grid_cols), else None.
    key:          `image_key`: the identity the prefix and feature caches share images by.
    """

    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    grid: tuple[int, int] | None
    key: bytes


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, compositing transparency onto white (transformers' convert_to_rgb).

    "Has alpha" is transformers' test: an "A" band (RGBA, LA, PA) or a `transparency` entry in
    `image.info` (palette or colour-key transparency). Everything else is a plain PIL convert.
    """
    try:
        if image.mode == "RGB" and image.info.get("transparency") is None:
            return image                  # Pillow's convert would only copy it
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {e}") from e


def normalize_table(cfg: ImageProcessorConfig) -> torch.Tensor:
    """float32 [3, 256]: the output value for every (channel, uint8 value) pair.

    Mirrors `image_transforms.rescale` (uint8 -> float64, times the Python-float factor, cast
    to float32) and `image_transforms.normalize` (float32 mean/std arrays; `(x - mean) / std`
    evaluated in float32). Without rescale, normalize starts from `uint8 -> float32`.
    """
    x = torch.arange(256, dtype=torch.float64)
    x = (x * cfg.rescale_factor).to(torch.float32) if cfg.do_rescale else x.to(torch.float32)
    x = x.expand(3, 256)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None]
        std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None]
        x = (x - mean) / std
    return x.contiguous()


def _finish(px, x, cfg: ImageProcessorConfig):
    """PIL image or NHWC batch -> NHWC: shortest-edge resize, then center crop."""
    h, w = (x.height, x.width) if isinstance(x, Image.Image) else tuple(x.shape[1:3])
    size = cfg.resize_hw or shortest_edge_size(h, w, cfg.shortest_edge)
    crop = (cfg.crop_h, cfg.crop_w) if cfg.do_center_crop else size
    if size == (h, w):
        x = px.to_array(x)
    elif not isinstance(x, Image.Image):
        x = px.resize(x, size, cfg.resample)
    elif crop[0] <= size[0] and crop[1] <= size[1]:   # resize only the part the crop keeps
        window = ((size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2, *crop)
        return px.resize_source(x, [size], cfg.resample, [window])[0]
    else:
        x = px.resize_source(x, [size], cfg.resample)[0]
    return center_crop(px, x, *crop) if cfg.do_center_crop else x


def _anyres(px, src, image_hw: tuple[int, int], cfg: ImageProcessorConfig):
    """LlavaNextImageProcessorPil.get_image_patches: [base] + grid tiles (row-major), and the grid.

    The image is resized (aspect kept, `resize_within`) into the best pinpoint canvas, placed on
    black at `pad_offsets`, and cut into crop_h-sized square tiles; the base image is the whole
    original resized to shortest_edge x shortest_edge (aspect NOT kept). Each then goes through
    the shortest-edge resize + center crop (no-ops for llava-hf configs).
    """
    t, edge = cfg.crop_h, cfg.shortest_edge
    target = select_best_resolution(image_hw, cfg.pinpoints)
    inner = resize_within(image_hw, target)
    sizes = [s for s in (inner, (edge, edge)) if s != image_hw]
    resized = dict(zip(sizes, px.resize_source(src, sizes, cfg.resample)))   # both read the whole source
    grid, base = (resized[s] if s in resized else px.to_array(src) for s in (inner, (edge, edge)))
    canvas = pad_into(px, grid, target, pad_offsets(inner, target), 0)
    rows, cols = target[0] // t, target[1] // t
    tiles = px.permute(canvas.reshape(rows, t, cols, t, 3), (0, 2, 1, 3, 4)).reshape(rows * cols, t, t, 3)
    return px.cat([_finish(px, base, cfg), _finish(px, tiles, cfg)]), (rows, cols)


def preprocess(image: Image.Image, cfg: ImageProcessorConfig, device: torch.device | str | None = None,
               backend: str | None = None) -> ProcessedImage:
    """A PIL image of any mode -> `ProcessedImage` with pixel_values on `device` (default CPU).

    backend: "pil" (Pillow resizes + numpy, on the CPU) or "torch" (every step in torch on
    `device`); None picks "pil" for the CPU and "torch" for any other device. Both give the same
    bits (see the module docstring for the rules).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"cannot preprocess an empty image of size {image.size}")
    device = torch.device("cpu" if device is None else device)
    backend = backend or ("pil" if device.type == "cpu" else "torch")
    if backend not in ("pil", "torch"):
        raise ValueError(f"preprocess backend must be 'pil' or 'torch', got {backend!r}")
    if cfg.do_convert_rgb:
        rgb = convert_to_rgb(image)
    elif image.mode == "RGB":
        rgb = image
    else:
        raise ValueError(f"do_convert_rgb is False but the image has mode {image.mode!r}; "
                         "only RGB images can skip the conversion")
    rgb.load()             # decode a lazily opened file now, before several threads read it
    image_hw = (rgb.height, rgb.width)
    if backend == "pil":   # the key (copies of the pixels + hashes) runs with the resizes' bands
        px = NumpyPixels(key_tasks(rgb, cfg))
        pixels = None
    else:
        rgbx = rgbx_pixels(rgb)
        pixels, px = rgbx[..., :3], TorchPixels(device, key=image_key(rgbx, cfg))
    with px.context():
        src = px.source(rgb, pixels)
        grid = None
        if cfg.pinpoints is not None:
            batch, grid = _anyres(px, src, image_hw, cfg)
        else:
            if cfg.pad_to_square and image_hw[0] != image_hw[1]:
                side = max(image_hw)
                offset = ((side - image_hw[0]) // 2, (side - image_hw[1]) // 2)  # odd pixel bottom/right
                src = pad_into(px, px.to_array(src), (side, side), offset, cfg.pad_color)
            batch = _finish(px, src, cfg)
        pixel_values = px.done(px.normalize(batch, normalize_table(cfg)).to(device))
    return ProcessedImage(pixel_values=pixel_values, image_size=image_hw, grid=grid, key=px.key())
