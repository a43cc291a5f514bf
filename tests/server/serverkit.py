"""Helpers of the server tests (the fixtures built on them are in conftest.py). Import them from
here, not from conftest: pytest registers every conftest.py as the module `conftest`, so
`from conftest import X` finds whichever conftest was loaded last.

    server = launch_server(model_dir, tmp_dir, "--api-key", "k", tls=tls)   # waits for /health
    server.url, server.port, server.ca (None without TLS), server.client(), server.log_text()
    server.stop() / server.kill()
    host, stop = serve_images(png)     # loopback image host, see serve_images
    files = make_tls(folder)           # trustme CA + a localhost certificate
"""

from __future__ import annotations

import dataclasses
import http.server
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_png(w: int = 40, h: int = 32, seed: int = 7) -> bytes:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---- loopback image host ----------------------------------------------------------------------
@dataclasses.dataclass
class ImageHost:
    url: str                  # http://127.0.0.1:<port>
    hits: dict[str, int]      # path → requests served


def serve_images(png_bytes: bytes):
    """A loopback HTTP image host → (ImageHost, stop). /img.png the given PNG; /big.png 600x500 (300k pixels); /slow.png never answers within
    the test timeouts; /500.png an HTTP 500; /redirect-loopback a 302 to /img.png."""
    big = make_png(600, 500, seed=3)
    hits: dict[str, int] = {}
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/slow.png":
                release.wait(30)
                return
            if self.path == "/500.png":
                self.send_error(500, "boom")
                return
            if self.path == "/redirect-loopback":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = {"/img.png": png_bytes, "/big.png": big}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop():
        release.set()
        httpd.shutdown()
        httpd.server_close()

    return ImageHost(f"http://127.0.0.1:{httpd.server_address[1]}", hits), stop


# ---- TLS ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TLSFiles:
    ca: str        # CA bundle clients trust (SSL_CERT_FILE / verify=)
    cert: str      # server certificate chain for localhost / 127.0.0.1
    key: str


def make_tls(folder: Path) -> TLSFiles:
    """A throwaway CA (trustme) and a certificate for localhost / 127.0.0.1, written to folder."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = TLSFiles(str(folder / "ca.pem"), str(folder / "cert.pem"), str(folder / "key.pem"))
    ca.cert_pem.write_to_path(paths.ca)
    cert.private_key_and_cert_chain_pem.write_to_path(paths.cert)
    cert.private_key_pem.write_to_path(paths.key)
    return paths


# ---- server subprocess --------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, ca: str | None):
        self.proc, self.port, self.log_path, self.ca = proc, port, log_path, ca
        scheme = "https" if ca else "http"
        self.url = f"{scheme}://localhost:{port}"

    def client(self, **kwargs) -> httpx.Client:
        verify = ssl.create_default_context(cafile=self.ca) if self.ca else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=60, **kwargs)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def launch_server(model: str | Path, data_dir: str | Path, *args: str, tls: TLSFiles | None = None,
                  port: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m fastllava serve` and wait until /health answers 200."""
    port = port or free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fastllava", "serve", "--model", str(model), "--port", str(port),
           "--host", "127.0.0.1", "--data-dir", str(data_dir), "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning", *args]
    if tls is not None:
        cmd += ["--tls-cert", tls.cert, "--tls-key", tls.key]
    log_path = data_dir / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "*"}
    full_env.pop("FASTLLAVA_API_KEYS", None)  # only what the test passes in `env`
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, log_path, tls.ca if tls else None)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with server.client() as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if client.get("/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n"
                                   f"{server.log_text()}")
            time.sleep(0.1)


# The settings of the two servers the server tests share (conftest: strict_server, lenient_server).
API_KEY = "secret-key"
ENV_KEYS = ("env-key-1", "env-key-2")
STRICT_LIMITS = {"max_body_bytes": 300_000, "max_image_bytes": 60_000, "max_image_pixels": 100_000,
                 "max_prompt_chars": 2000, "max_tokens_limit": 2048}
