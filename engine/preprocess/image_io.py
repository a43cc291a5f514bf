"""Load an image from an http(s) URL, a base64 data URI or a local path, with hard limits.

`load_image(src, limits)` returns what transformers' `image_utils.load_image` returns for the
same bytes (`ImageOps.exif_transpose`, then `.convert("RGB")`: alpha is DROPPED here, not
composited; for animated images, the first frame). Around that it enforces, for untrusted input:

- bytes: `max_bytes` for the download (Content-Length and the running total while streaming), the
  decoded data URI and the file size;
- pixels: `max_pixels` checked from the header (`Image.open` parses only the header) before any
  pixel is decoded; PIL's own DecompressionBombError/Warning never escape. With `square_canvas`
  (a model that pads images to a square first) the padded square counts;
- shape: `max_aspect_ratio` (long side / short side), also from the header. Preprocessing cost
  follows the shape, not only the pixel count: a 1x40,000,000 PNG decodes in 0.5 s but its
  bicubic resizes take seconds (anyres), a shortest-edge resize blows it up to 336 x 13.4e9
  (LLaVA-1.5), and padding to a square makes a 40M x 40M canvas;
- network and time (`allow_private_hosts`, `timeout_s`): URLs are fetched by image_fetch.py,
  which checks every connected address against the host policy and bounds the wall time of the
  whole fetch.

Every failure is an `ImageError` (a ValueError) subclass whose message names the source.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# Public here too (webhooks and tests import it from this module); image_fetch.py applies it.
from .addresses import is_public_address

__all__ = ["ImageError", "ImageFetchError", "ImageDecodeError", "ImageTooLargeError",
           "ImageLimits", "is_public_address", "load_image"]

# Raster formats PIL may try. Untrusted bytes never reach EPS (it runs Ghostscript), WMF or the
# many scientific/legacy plugins; anything else is "not an image in a supported format".
_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "QOI",
            "JPEG2000", "AVIF")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class ImageError(ValueError):
    """The image source is unusable (bad input: a 4xx for a server)."""


class ImageFetchError(ImageError):
    """The bytes could not be obtained: unreachable host, HTTP status >= 400, timeout, refused
    or unsupported source (scheme, local path), missing file."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image: corrupt, truncated, not an image, bad data URI."""


class ImageTooLargeError(ImageError):
    """Over the byte limit, or over the pixel limit (decompression bomb)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024    # download / decoded data URI / file size
    max_pixels: int = 40_000_000         # width * height, from the header, before decoding
    # long side / short side, from the header. 50 keeps panoramas and long screenshots; at 40 M
    # pixels and 50:1 preprocessing costs about what a square image does (~0.5 s on one core).
    max_aspect_ratio: float = 50.0
    # The model pads images to a square before resizing (LLaVA-1.5 "pad" mode): max_pixels then
    # bounds that canvas, long side squared, which is what is allocated and resized.
    square_canvas: bool = False
    timeout_s: float = 15.0              # total wall time of a URL fetch
    allow_local_paths: bool = True       # the HTTP server passes False
    # False (the HTTP server's default): URLs whose host resolves to a loopback, private,
    # link-local, multicast or reserved address are refused, checked at connect time for every
    # hop (redirects too) and DNS-rebinding safe: the checked address is the one connected to.
    allow_private_hosts: bool = True

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImageLimits.{name} must be positive, got {getattr(self, name)!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"ImageLimits.max_aspect_ratio must be >= 1, "
                             f"got {self.max_aspect_ratio!r}")

    def check_size(self, w: int, h: int, name: str) -> None:
        """Refuse a width x height (from an image header) over the pixel or aspect-ratio limit."""
        if w < 1 or h < 1:
            raise ImageDecodeError(f"image {name} has an empty size {w}x{h}")
        if w * h > self.max_pixels:
            raise ImageTooLargeError(f"image {name} is {w}x{h} = {w * h} pixels, over the limit "
                                     f"of {self.max_pixels} (checked before decoding)")
        if max(w, h) > self.max_aspect_ratio * min(w, h):
            raise ImageTooLargeError(
                f"image {name} is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):.1f}:1, over "
                f"the limit of {self.max_aspect_ratio:g}:1 (checked before decoding)")
        if self.square_canvas and max(w, h) ** 2 > self.max_pixels:
            side = max(w, h)
            raise ImageTooLargeError(
                f"image {name} is {w}x{h}; this model pads it to a {side}x{side} square = "
                f"{side * side} pixels, over the limit of {self.max_pixels} "
                "(checked before decoding)")


def _describe(src: str) -> str:
    """A short, safe name for the source in error messages (never a data URI's payload)."""
    if src[:5].lower() == "data:":
        return f"data URI ({src[5:src.find(',')][:60] if ',' in src else 'no comma'}, {len(src)} chars)"
    return repr(src if len(src) <= 200 else src[:200] + "...")


def load_image(src: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """http(s) URL, `data:<mime>;base64,...` URI or (if allowed) local path -> RGB PIL image."""
    if not isinstance(src, str):
        raise ImageError(f"image source must be a string (URL, data URI or path), got {type(src).__name__}")
    if not src.strip():
        raise ImageError("image source is an empty string")
    name = _describe(src)
    match = _SCHEME.match(src)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        from .image_fetch import fetch_url  # here, not above: image_fetch imports our errors
        data = fetch_url(src, name, limits)
    elif scheme == "data":
        data = _decode_data_uri(src, name, limits)
    elif not limits.allow_local_paths:
        if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
            raise ImageFetchError(f"unsupported image source scheme {scheme!r} in {name}: "
                                  "use http(s):// or a data: URI")
        raise ImageFetchError(f"local image paths are not allowed here: {name}")
    elif os.path.isfile(src):
        data = _read_file(src, name, limits)
    elif len(scheme) > 1:
        raise ImageFetchError(f"unsupported image source scheme {scheme!r} in {name}: "
                              "use http(s)://, a data: URI or a local path")
    elif os.path.exists(src):
        raise ImageFetchError(f"image path {name} is not a regular file")
    else:
        raise ImageFetchError(f"image file {name} does not exist")
    return _decode(data, name, limits)


def _read_file(path: str, name: str, limits: ImageLimits) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"image file {name} is {size} bytes, over the limit of {limits.max_bytes}")
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise ImageFetchError(f"cannot read image file {name}: {e}") from e
    if len(data) > limits.max_bytes:  # the file grew after the size check
        raise ImageTooLargeError(f"image file {name} is over the limit of {limits.max_bytes} bytes")
    return data


def _decode_data_uri(src: str, name: str, limits: ImageLimits) -> bytes:
    header, comma, payload = src[5:].partition(",")
    if not comma:
        raise ImageDecodeError(f"malformed {name}: no ',' separating the header from the data")
    if not header.lower().endswith(";base64"):
        raise ImageDecodeError(f"unsupported {name}: only base64 data URIs "
                               "('data:<mime>;base64,...') are accepted")
    payload = re.sub(r"\s+", "", payload)  # line-wrapped base64 is common
    if len(payload) // 4 * 3 > limits.max_bytes + 2:  # decoded size, checked before decoding
        raise ImageTooLargeError(f"{name} decodes to about {len(payload) // 4 * 3} bytes, "
                                 f"over the limit of {limits.max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError(f"invalid base64 in {name}: {e}") from e
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{name} decodes to {len(data)} bytes, over the limit of {limits.max_bytes}")
    if not data:
        raise ImageDecodeError(f"{name} has no data")
    return data


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    """Bytes -> RGB image: header-only size check first, then a full decode inside a try."""
    try:
        with warnings.catch_warnings():
            # Our max_pixels check replaces PIL's global bomb heuristics (warning at ~89 MP).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()
            formats = [f for f in _FORMATS if f in Image.OPEN]
            img = Image.open(io.BytesIO(data), formats=formats)  # parses the header only
            limits.check_size(*img.size, name)
            img.seek(0)        # animated images: the first frame
            img.load()         # decodes; truncated data raises (LOAD_TRUNCATED_IMAGES stays False)
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image {name} is too large to decode: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError(f"{name} is not an image in a supported format "
                               f"({', '.join(_FORMATS)})") from e
    except MemoryError as e:
        raise ImageTooLargeError(f"out of memory decoding image {name}") from e
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ... on bad data
        raise ImageDecodeError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
