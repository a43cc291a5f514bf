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
- network: with `allow_private_hosts=False` every address a host name resolves to must be public
  (`is_public_address`), checked when each connection (redirects included) is opened; the socket
  then connects to that checked address while the Host header and TLS SNI/certificate check keep
  the original name, so a DNS answer that changes between check and use cannot reach an internal
  address. Environment proxies are not used in that mode (the proxy would resolve the name);
- time: `timeout_s` is the wall time of the whole fetch (DNS, connect, headers, body). The fetch
  runs in a daemon thread; at the deadline the caller gets ImageFetchError and the thread's
  sockets are shut down, so a server that accepts and never answers, or trickles bytes, cannot
  hang the caller (a stuck DNS lookup can only leave the abandoned thread waiting).

Every failure is an `ImageError` (a ValueError) subclass whose message names the source.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from .addresses import is_public_address

__all__ = ["ImageError", "ImageFetchError", "ImageDecodeError", "ImageTooLargeError",
           "ImageLimits", "is_public_address", "load_image"]

_CHUNK = 64 * 1024
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
        data = _fetch_url(src, name, limits)
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


# ---------------------------------------------------------------------------------------------
# HTTP(S) fetch with a total deadline.


class _Watchdog:
    """Tracks the sockets a fetch opens; `expire()` shuts them down to unblock the fetch thread."""

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError("deadline passed")
        return left

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if not self.expired:
                return
        self._shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:  # the plain-socket shutdown also works under an SSL wrapper; recv then returns EOF
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _checked_create_connection(name: str):
    """socket.create_connection that connects only to public addresses of the host."""

    def create(address, timeout=socket.getdefaulttimeout(), source_address=None, **kwargs):
        host, port = address[0], address[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ImageFetchError(f"cannot resolve host {host!r} of image {name}: {e}") from e
        if not infos or not all(is_public_address(info[4][0]) for info in infos):
            # The message names the host as given, never the address it resolved to: a client
            # must not be able to map the server's internal DNS through refusals.
            raise ImageFetchError(
                f"image host {host!r} of {name} resolves to a non-public address: loopback, "
                "private, link-local, multicast and reserved addresses are refused by the "
                "server's policy")
        error: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:  # connect to the address just checked
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    return create


def _connection_factory(base, watchdog: _Watchdog, limits: ImageLimits, name: str):
    """An http.client connection class (for urllib's do_open) that reports its socket and, when
    private hosts are refused, opens it through `_checked_create_connection`."""

    def make(host, timeout=None, **kwargs):
        conn = base(host, timeout=min(watchdog.remaining(), timeout or watchdog.remaining()), **kwargs)
        if not limits.allow_private_hosts:
            # http.client opens its socket through this attribute; HTTPS wraps that socket
            # with server_hostname=conn.host, the original name (SNI and certificate check).
            conn._create_connection = _checked_create_connection(name)
        connect = conn.connect

        def connect_and_register():
            connect()
            watchdog.register(conn.sock)

        conn.connect = connect_and_register
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog, limits, name):
        super().__init__()
        self.args = (watchdog, limits, name)

    def http_open(self, req):
        return self.do_open(_connection_factory(http.client.HTTPConnection, *self.args), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog, limits, name):
        super().__init__()
        self.args = (watchdog, limits, name)

    def https_open(self, req):
        return self.do_open(_connection_factory(http.client.HTTPSConnection, *self.args), req,
                            context=self._context)


def _opener(watchdog: _Watchdog, limits: ImageLimits, name: str) -> urllib.request.OpenerDirector:
    # Only http(s), redirects (max 10) and error mapping: no file:, ftp: or data: handlers, so a
    # redirect cannot reach a local file. Proxies from the environment are honoured unless
    # private hosts are refused (a proxy would resolve the name where we cannot check it).
    proxies = None if limits.allow_private_hosts else {}
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(proxies), _HTTPHandler(watchdog, limits, name),
                    _HTTPSHandler(watchdog, limits, name), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _download(url: str, name: str, limits: ImageLimits, watchdog: _Watchdog) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "fastllava", "Accept": "image/*,*/*"})
    with _opener(watchdog, limits, name).open(req, timeout=watchdog.remaining()) as resp:
        length = resp.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > limits.max_bytes:
            raise ImageTooLargeError(f"image at {name} is {int(length)} bytes (Content-Length), "
                                     f"over the limit of {limits.max_bytes}")
        chunks, total = [], 0
        while True:
            chunk = resp.read1(_CHUNK)  # returns what one recv gives: trickled bytes surface here
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_bytes:
                raise ImageTooLargeError(f"image at {name} is over the limit of {limits.max_bytes} bytes")
            chunks.append(chunk)
            watchdog.remaining()
        if watchdog.expired:
            raise TimeoutError("deadline passed")
    return b"".join(chunks)


def _fetch_url(url: str, name: str, limits: ImageLimits) -> bytes:
    watchdog = _Watchdog(limits.timeout_s)
    box: dict = {}
    done = threading.Event()

    def work():
        try:
            box["data"] = _download(url, name, limits, watchdog)
        except BaseException as e:  # handed to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="fastllava-image-fetch", daemon=True).start()
    if not done.wait(max(0.0, watchdog.deadline - time.monotonic())) or watchdog.expired:
        watchdog.expire()
        raise ImageFetchError(f"timed out after {limits.timeout_s:g} s fetching image {name}")
    watchdog.expire()  # also closes anything left open on the success path
    err = box.get("error")
    if err is None:
        return box["data"]
    if isinstance(err, ImageError):
        raise err
    if isinstance(err, urllib.error.HTTPError):
        raise ImageFetchError(f"HTTP {err.code} {err.reason} fetching image {name}") from err
    if isinstance(err, (TimeoutError, socket.timeout)) or (
            isinstance(err, urllib.error.URLError) and isinstance(err.reason, (TimeoutError, socket.timeout))):
        raise ImageFetchError(f"timed out after {limits.timeout_s:g} s fetching image {name}") from err
    if isinstance(err, urllib.error.URLError):
        raise ImageFetchError(f"cannot fetch image {name}: {err.reason}") from err
    if isinstance(err, (OSError, http.client.HTTPException, ValueError)):
        raise ImageFetchError(f"cannot fetch image {name}: {type(err).__name__}: {err}") from err
    raise err
