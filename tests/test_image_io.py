"""load_image: same pixels as transformers' load_image for every source kind, typed errors, limits.

HTTP cases run against stdlib servers on 127.0.0.1 started here (no outside network).
"""

from __future__ import annotations

import base64
import http.server
import io
import resource
import socket
import threading
import time
import warnings
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastllava.preprocess.image_io import (ImageDecodeError, ImageError, ImageFetchError, ImageLimits,
                                           ImageTooLargeError, load_image)

RNG = np.random.default_rng(0)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(RNG.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return _encode(_noise(40, 24), "JPEG", exif=exif.tobytes(), quality=90)


def _animated_gif() -> bytes:
    frames = [_noise(30, 20).convert("P") for _ in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only_bomb(w: int, h: int) -> bytes:
    """A 1-bit grayscale PNG of w x h whose IDAT is valid zlib of all-zero rows (a few KB)."""
    chunk = _png_chunk
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    body, rows_per = [], 1000
    for start in range(0, h, rows_per):
        body.append(comp.compress(row * min(rows_per, h - start)))
    body.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(body))
            + chunk(b"IEND", b""))


SAMPLES = {
    "rgb.png": _encode(_noise(33, 17), "PNG"),
    "rgba.png": _encode(_noise(20, 31, "RGBA"), "PNG"),
    "palette.png": _encode(_noise(25, 25).convert("P"), "PNG"),
    "exif.jpg": _exif_jpeg(),
    "anim.gif": _animated_gif(),
    "gray.webp": _encode(_noise(16, 12).convert("L"), "WEBP", lossless=True),
}


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --- HTTP test server ------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    stop = threading.Event()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.lstrip("/")
        try:
            if path in SAMPLES:
                self._send(200, SAMPLES[path], [("Content-Type", "application/octet-stream")])
            elif path == "redirect":
                self._send(302, headers=[("Location", "/rgb.png")])
            elif path == "redirect-file":
                self._send(302, headers=[("Location", "file:///etc/passwd")])
            elif path == "big-length":
                self._send(200, SAMPLES["rgb.png"], [("Content-Length", str(10**9))])
            elif path == "big-stream":  # no Content-Length, the body just keeps coming
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            elif path == "trickle-body":
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                while not self.stop.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "trickle-headers":  # status line never ends: defeats per-read timeouts
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not self.stop.is_set():
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts TCP connections (kernel backlog) and never says anything."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# --- same pixels as transformers ---------------------------------------------------------------

@pytest.mark.network
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sources_match_transformers(name, tmp_path, server):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / name
    path.write_bytes(SAMPLES[name])
    ref = hf_load_image(str(path))
    ref_pixels = np.array(ref)
    for src in (str(path), _data_uri(SAMPLES[name]), f"{server}/{name}"):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == ref.size, (src[:60], img.mode, img.size, ref.size)
        pixels = np.array(img)
        assert np.array_equal(pixels, ref_pixels), (
            f"{src[:60]}: {np.count_nonzero(pixels != ref_pixels)} values differ")


def test_exif_rotation_and_first_frame_are_applied(tmp_path):
    rotated = load_image(_data_uri(SAMPLES["exif.jpg"]))
    assert rotated.size == (24, 40), rotated.size  # stored 40x24, displayed portrait
    with Image.open(io.BytesIO(SAMPLES["anim.gif"])) as gif:
        assert gif.n_frames == 3
        first = np.array(gif.convert("RGB"))
    assert np.array_equal(np.array(load_image(_data_uri(SAMPLES["anim.gif"]))), first)


@pytest.mark.network
def test_redirect_is_followed(server):
    ref = np.array(load_image(_data_uri(SAMPLES["rgb.png"])))
    assert np.array_equal(np.array(load_image(f"{server}/redirect")), ref)


# --- fetch errors ----------------------------------------------------------------------------

def _raises(cls, src, limits=ImageLimits(), match=None, max_s=2.0):
    t0 = time.monotonic()
    with pytest.raises(cls, match=match) as info:
        load_image(src, limits)
    elapsed = time.monotonic() - t0
    assert elapsed < max_s, f"{src[:60]!r} took {elapsed:.2f} s to fail"
    return info.value


@pytest.mark.network
def test_closed_port_fails_fast():
    _raises(ImageFetchError, f"http://127.0.0.1:{_closed_port()}/x.png", match="cannot fetch")


@pytest.mark.network
def test_http_404(server):
    err = _raises(ImageFetchError, f"{server}/missing.png", match="404")
    assert "missing.png" in str(err)


@pytest.mark.network
@pytest.mark.parametrize("kind", ["silent", "trickle-body", "trickle-headers"])
def test_slow_servers_time_out(kind, server, silent_port):
    timeout = 1.0
    url = f"http://127.0.0.1:{silent_port}/x.png" if kind == "silent" else f"{server}/{kind}"
    t0 = time.monotonic()
    _raises(ImageFetchError, url, ImageLimits(timeout_s=timeout), match="timed out", max_s=timeout + 2)
    assert time.monotonic() - t0 >= timeout * 0.9  # it did wait for the deadline, not fail early


@pytest.mark.network
@pytest.mark.parametrize("kind", ["big-length", "big-stream"])
def test_url_over_max_bytes(kind, server):
    _raises(ImageTooLargeError, f"{server}/{kind}", ImageLimits(max_bytes=1_000_000), match="limit")


@pytest.mark.network
def test_redirect_to_file_scheme_is_refused(server):
    _raises(ImageFetchError, f"{server}/redirect-file")


@pytest.mark.parametrize("src, cls, match", [
    ("", ImageError, "empty"),
    ("   ", ImageError, "empty"),
    ("ftp://example.com/a.png", ImageFetchError, "unsupported image source scheme 'ftp'"),
    ("file:///etc/hostname", ImageFetchError, "unsupported image source scheme 'file'"),
    ("/definitely/not/here.png", ImageFetchError, "does not exist"),
    ("http://", ImageFetchError, "cannot fetch"),
])
def test_bad_sources(src, cls, match):
    _raises(cls, src, match=match)


def test_non_string_source():
    with pytest.raises(ImageError, match="must be a string"):
        load_image(b"abc")  # type: ignore[arg-type]


def test_directory_is_not_an_image(tmp_path):
    _raises(ImageFetchError, str(tmp_path), match="not a regular file")


def test_local_paths_refused_when_not_allowed(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(SAMPLES["rgb.png"])
    no_local = ImageLimits(allow_local_paths=False)
    err = _raises(ImageFetchError, str(path), no_local, match="local image paths are not allowed")
    assert "a.png" in str(err)
    _raises(ImageFetchError, "ftp://x/y.png", no_local, match="scheme 'ftp'")
    assert load_image(_data_uri(SAMPLES["rgb.png"]), no_local).size == (33, 17)


# --- decode errors and limits ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_error(fmt, tmp_path):
    data = _encode(_noise(64, 48), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    for cut in (0.5, 0.9):
        path = tmp_path / f"cut{cut}.{fmt.lower()}"
        path.write_bytes(data[: int(len(data) * cut)])
        _raises(ImageDecodeError, str(path), match="truncated")


@pytest.mark.parametrize("payload, match", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode|not an image"),
    (b"hello, this is a text file\n" * 20, "not an image"),
    (bytes(RNG.integers(0, 256, 3000, dtype=np.uint8)), "not an image"),
    (_encode(Image.new("RGB", (8, 8)), "PCX"), "not an image in a supported format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),  # never Ghostscript
])
def test_corrupt_and_non_images(payload, match, tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(payload)
    _raises(ImageDecodeError, str(path), match=match)
    _raises(ImageDecodeError, _data_uri(payload), match=match)


@pytest.mark.parametrize("uri, match", [
    ("data:image/png;base64", "no ','"),
    ("data:image/png,%89PNG", "only base64"),
    ("data:image/png;base64,@@@@not*base64", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
    ("data:image/png;base64,", "no data"),
])
def test_bad_data_uris(uri, match):
    err = _raises(ImageDecodeError, uri, match=match)
    assert "data URI" in str(err)


def test_data_uri_line_wrapped_base64_is_accepted():
    b64 = base64.encodebytes(SAMPLES["rgb.png"]).decode()  # 76-column lines
    assert "\n" in b64
    assert load_image("data:image/png;base64," + b64).size == (33, 17)


def test_over_max_bytes_data_uri_and_file(tmp_path):
    data = SAMPLES["rgb.png"]
    limits = ImageLimits(max_bytes=len(data) - 1)
    _raises(ImageTooLargeError, _data_uri(data), limits, match="over the limit")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    _raises(ImageTooLargeError, str(path), limits, match="over the limit")
    assert load_image(str(path), ImageLimits(max_bytes=len(data))).size == (33, 17)


@pytest.mark.parametrize("side", [7000, 10000, 20000])
def test_decompression_bomb_rejected_before_decoding(side, tmp_path):
    """7000^2 hits our 40 MP check; 10000^2 is in PIL's warning band; 20000^2 in PIL's error band.
    Decoding any of them would allocate 49-400 MB: peak RSS must not move."""
    bomb = _png_header_only_bomb(side, side)
    assert len(bomb) < 200_000, len(bomb)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an escaping DecompressionBombWarning would fail the test
        err = _raises(ImageTooLargeError, str(path), max_s=1.0)
        _raises(ImageTooLargeError, _data_uri(bomb), max_s=1.0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 30, f"peak RSS grew by {grown_mb:.0f} MB: pixels were decoded"
    assert f"{side}x{side}" in str(err) or "too large" in str(err), str(err)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        ImageLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ImageLimits(max_bytes=-1)


def test_pixel_limit_is_configurable():
    uri = _data_uri(SAMPLES["rgb.png"])  # 33 x 17 = 561 pixels
    _raises(ImageTooLargeError, uri, ImageLimits(max_pixels=560), match="561 pixels")
    assert load_image(uri, ImageLimits(max_pixels=561)).size == (33, 17)


def _png_with_corrupt_pixels(w: int, h: int) -> bytes:
    """A valid PNG header (IHDR) of w x h followed by pixel data that cannot be decoded: any
    check that refuses it with ImageTooLargeError ran on the header alone."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"not zlib")
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(40_000_000, 1), (1, 40_000_000), (5001, 100)])
def test_extreme_aspect_ratio_is_refused_from_the_header(w, h):
    """Inside the 40 M pixel limit, but its resizes would cost seconds (or overflow): refused,
    naming the ratio, before a pixel is decoded (the pixel data here is corrupt)."""
    err = _raises(ImageTooLargeError, _data_uri(_png_with_corrupt_pixels(w, h)), max_s=0.5)
    assert f"{w}x{h}" in str(err) and f"aspect ratio of {max(w, h) / min(w, h):.1f}:1" in str(err)
    assert "over the limit of 50:1" in str(err), str(err)
    # The same corrupt data inside the ratio limit reaches the decoder (and fails there).
    _raises(ImageDecodeError, _data_uri(_png_with_corrupt_pixels(5000, 100)))


def test_aspect_ratio_limit_is_inclusive_and_configurable():
    at_limit = _data_uri(_encode(_noise(100, 2), "PNG"))          # 50:1
    assert load_image(at_limit).size == (100, 2)
    over = _data_uri(_encode(_noise(2, 101), "PNG"))              # 50.5:1
    _raises(ImageTooLargeError, over, match="aspect ratio of 50.5:1")
    assert load_image(over, ImageLimits(max_aspect_ratio=51)).size == (2, 101)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ImageLimits(max_aspect_ratio=0.5)


def test_square_canvas_counts_the_padded_square():
    """A model that pads to a square first (LLaVA-1.5 "pad" mode) allocates long side²."""
    uri = _data_uri(_encode(_noise(100, 10), "PNG"))             # 1000 pixels, a 10000 canvas
    assert load_image(uri, ImageLimits(max_pixels=1000)).size == (100, 10)
    _raises(ImageTooLargeError, uri, ImageLimits(max_pixels=9999, square_canvas=True),
            match="100x100 square = 10000 pixels")
    assert load_image(uri, ImageLimits(max_pixels=10000, square_canvas=True)).size == (100, 10)


def test_pad_mode_checkpoint_limits_its_square_canvas(tiny_llava, tmp_path):
    """A LLaVA-1.5 checkpoint in the original repo's "pad" mode loads images with square_canvas,
    so a wide image whose padded square is over the pixel limit is refused before decoding."""
    from fastllava import LLaVA
    from fastllava.weights import convert_checkpoint

    pad = convert_checkpoint(tiny_llava, "original", tmp_path / "llava")
    llava = LLaVA.from_pretrained(pad, device="cpu", dtype="float32",
                                  image_limits=ImageLimits(max_pixels=2000))
    try:
        assert llava.image_config.pad_to_square and llava.image_limits.square_canvas
        wide = _data_uri(_encode(_noise(50, 10), "PNG"))          # 500 pixels, a 2500 canvas
        with pytest.raises(ImageTooLargeError, match="50x50 square = 2500 pixels"):
            llava.generate({"image_url": wide, "prompt": "hi", "max_tokens": 1})
        square = _data_uri(_encode(_noise(40, 40), "PNG"))
        out = llava.generate({"image_url": square, "prompt": "hi", "max_tokens": 1})
        assert out["partial"] is False
    finally:
        llava.close()
