"""The image-host policy at connect time (redirects, every resolved address, DNS rebinding),
the submit-time URL precheck and in-band mid-stream errors — in process,
no server subprocess.

Connect-time tests make 127.0.0.1 count as "public" and 127.0.0.2 as private (both reach the
loopback interface) by patching `is_public_address`, so real sockets show which address the
loader actually connected to.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading

import httpx
import pytest

from fastllava.preprocess import image_fetch
from fastllava.preprocess.image_io import ImageFetchError, ImageLimits, load_image
from fastllava.schema import RequestValidationError
from fastllava.server.app import create_app
from fastllava.server.safety import precheck_image_url
from fastllava.server.settings import ServerSettings

from serverkit import make_png

STRICT = ImageLimits(allow_private_hosts=False, timeout_s=5)


def _serve(address: str, png: bytes, seen: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Host")))
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", "http://" + self.path[4:])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


@pytest.fixture
def hosts(monkeypatch):
    """(public server on 127.0.0.1, private server on 127.0.0.2, requests seen by each)."""
    png = make_png()
    seen_a, seen_b = [], []
    try:
        b = _serve("127.0.0.2", png, seen_b)
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.2: {e}")
    a = _serve("127.0.0.1", png, seen_a)
    monkeypatch.setattr(image_fetch, "is_public_address", lambda addr: addr == "127.0.0.1")
    yield a.server_address[1], b.server_address[1], seen_a, seen_b
    for httpd in (a, b):
        httpd.shutdown()
        httpd.server_close()


def test_public_host_loads(hosts):
    port_a, _, seen_a, _ = hosts
    assert load_image(f"http://127.0.0.1:{port_a}/img.png", STRICT).size == (40, 32)
    assert seen_a == [("/img.png", f"127.0.0.1:{port_a}")]


def test_redirect_to_a_private_address_is_refused(hosts):
    port_a, port_b, seen_a, seen_b = hosts
    with pytest.raises(ImageFetchError, match=r"image host '127\.0\.0\.2' .*non-public address"):
        load_image(f"http://127.0.0.1:{port_a}/to/127.0.0.2:{port_b}/img.png", STRICT)
    assert len(seen_a) == 1 and seen_b == [], (seen_a, seen_b)


def test_every_resolved_address_is_checked(hosts, monkeypatch):
    port_a, _, seen_a, _ = hosts
    real = socket.getaddrinfo

    def two(host, port, *args, **kwargs):
        if host == "mixed.test":
            return real("127.0.0.1", port, *args, **kwargs) + real("127.0.0.2", port, *args,
                                                                   **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two)
    with pytest.raises(ImageFetchError, match="'mixed.test'.*non-public") as info:
        load_image(f"http://mixed.test:{port_a}/img.png", STRICT)
    assert "127.0.0." not in str(info.value), "the message names a resolved address"
    assert seen_a == [], "connected although one resolved address is private"


def test_dns_rebinding_connects_to_the_checked_address(hosts, monkeypatch):
    """The name resolves to a public address once, then to a private one (a rebinding DNS
    server): the loader connects to the address it checked, sending the original Host."""
    port_a, _, seen_a, seen_b = hosts
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            lookups.append(host)
            target = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
            return real(target, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert load_image(f"http://rebind.test:{port_a}/img.png", STRICT).size == (40, 32)
    assert lookups == ["rebind.test"], f"resolved {len(lookups)} times"
    assert seen_a == [("/img.png", f"rebind.test:{port_a}")] and seen_b == [], (seen_a, seen_b)


@pytest.mark.parametrize("url, ok", [
    ("https://example.com/a.png", True), ("data:image/png;base64,AAAA", True),
    ("http://127.0.0.1/a.png", False), ("http://LOCALHOST/a.png", False),
    ("http://x.localhost/a.png", False), ("http://[::ffff:10.0.0.1]/a.png", False),
    ("http://192.168.1.1/a.png", False), ("ftp://example.com/a.png", False),
    ("C:\\img.png", False), ("/tmp/a.png", False), ("http:///a.png", False),
    ("http://%00/a.png", False), ("http://a..b/a.png", False), ("https://bücher.de/a.png", True),
    ("https://a_b.example.com/a.png", True),
])
def test_precheck(url, ok):
    settings = ServerSettings(model="m", max_image_bytes=1000)
    if ok:
        precheck_image_url(url, settings)
    else:
        with pytest.raises(RequestValidationError) as info:
            precheck_image_url(url, settings)
        assert info.value.field == "image_url", info.value
    precheck_image_url("http://127.0.0.1/a.png",
                       ServerSettings(model="m", allow_private_image_hosts=True))
    with pytest.raises(RequestValidationError, match="over the limit"):
        precheck_image_url("data:image/png;base64," + "A" * 1400, settings)


class _FailingEngine:
    """A stand-in engine whose stream fails after two snapshots."""

    class config:
        kind = "llava"

    def stream_detailed(self, request, **kwargs):
        def gen():
            yield {"output": "Hel", "partial": True, "prompt_tokens": 5, "completion_tokens": 1,
                   "finish_reason": None}
            yield {"output": "Hello", "partial": True, "prompt_tokens": 5,
                   "completion_tokens": 2, "finish_reason": None}
            raise RuntimeError("device lost")
        return gen()


@pytest.fixture
def fake_app(data_uri):
    app = create_app(ServerSettings(model="m", endpoint_id="me/llava"), _FailingEngine())
    transport = httpx.ASGITransport(app=app)
    with_image = {"image_url": data_uri, "prompt": "hi", "max_tokens": 4}
    return transport, with_image


def test_mid_stream_errors_are_reported_in_band(fake_app):
    transport, request = fake_app

    async def calls():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            fal = await c.post("/me/llava/stream", json=request)
            chat = await c.post("/v1/chat/completions", json={
                "model": "me/llava", "stream": True, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": request["image_url"]}}]}]})
        return fal, chat

    fal, chat = asyncio.run(calls())
    events = [json.loads(line[6:]) for line in fal.text.splitlines() if line.startswith("data: ")]
    assert fal.status_code == 200 and [e.get("output") for e in events[:2]] == ["Hel", "Hello"]
    assert events[-1]["error_type"] == "internal_error" and "Traceback" not in fal.text, events
    lines = [line for line in chat.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2][6:])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in lines[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""}, deltas
    assert "".join(d.get("content", "") for d in deltas) == "Hello", deltas
