"""Fixtures of the server tests (helpers: serverkit.py).

Session: png_bytes, data_uri, image_host (loopback: /img.png, /big.png, /slow.png, /500.png,
/missing.png, /redirect-loopback), tls (throwaway CA), strict_server, lenient_server (one server
process each for the whole session). Module: server_factory (launch more servers; all stopped at
the end of the module). Session: redis_url (a throwaway redis-server, no persistence, when the
binary is installed; tests using it skip otherwise).
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time

import pytest

from serverkit import (API_KEY, ENV_KEYS, STRICT_LIMITS, ServerProcess, TLSFiles, launch_server,
                       make_png, make_tls, serve_images)


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return make_png()


@pytest.fixture(scope="session")
def data_uri(png_bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()


@pytest.fixture(scope="session")
def image_host(png_bytes):
    host, stop = serve_images(png_bytes)
    yield host
    stop()


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """launch(model, *args, tls=None, data_dir=None) → ServerProcess; all stopped at module end."""
    servers: list[ServerProcess] = []

    def launch(model, *args, tls=None, data_dir=None, **kwargs) -> ServerProcess:
        server = launch_server(model, data_dir or tmp_path_factory.mktemp("srv"), *args, tls=tls,
                               **kwargs)
        servers.append(server)
        return server

    yield launch
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def strict_server(tiny_llava, tls, tmp_path_factory):
    """HTTPS with the throwaway CA, API keys (--api-key and FASTLLAVA_API_KEYS), the default
    image policy (private hosts refused) and small limits (STRICT_LIMITS). One queued job runs at
    a time (--queue-concurrency 1), so a second job really waits in the queue."""
    args = ["--api-key", API_KEY, "--image-timeout-s", "3", "--queue-concurrency", "1"]
    for name, value in STRICT_LIMITS.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    server = launch_server(tiny_llava, tmp_path_factory.mktemp("strict"), *args, tls=tls,
                           env={"FASTLLAVA_API_KEYS": ",".join(ENV_KEYS)})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lenient_server(tiny_llava, tmp_path_factory):
    """Plain HTTP, no auth, loopback image hosts allowed, a 1.5 s image fetch limit, status-stream
    pings every 0.5 s."""
    server = launch_server(tiny_llava, tmp_path_factory.mktemp("lenient"),
                           "--allow-private-image-hosts", "--image-timeout-s", "1.5",
                           "--max-image-pixels", "100000", "--max-tokens-limit", "2048",
                           "--sse-ping-s", "0.5")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
