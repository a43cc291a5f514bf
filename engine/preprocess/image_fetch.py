"""The guarded HTTP(S) fetch behind `load_image` (image_io.py) for http:// and https:// sources.

Around urllib it enforces, for untrusted URLs:

- bytes: `max_bytes` from the Content-Length and from the running total while streaming;
- network: with `allow_private_hosts=False` every address a host name resolves to must be public
  (`is_public_address`), checked when each connection (redirects included) is opened; the socket
  then connects to that checked address while the Host header and TLS SNI/certificate check keep
  the original name, so a DNS answer that changes between check and use cannot reach an internal
  address. Environment proxies are not used in that mode (the proxy would resolve the name);
- time: `timeout_s` is the wall time of the whole fetch (DNS, connect, headers, body). The fetch
  runs in a daemon thread; at the deadline the caller gets ImageFetchError and the thread's
  sockets are shut down, so a server that accepts and never answers, or trickles bytes, cannot
  hang the caller (a stuck DNS lookup can only leave the abandoned thread waiting).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request

from .addresses import is_public_address
from .image_io import ImageError, ImageFetchError, ImageLimits, ImageTooLargeError

_CHUNK = 64 * 1024


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


def fetch_url(url: str, name: str, limits: ImageLimits) -> bytes:
    """The body of an http(s) URL within `limits` (bytes, total time, host policy); every failure
    is an ImageError naming `name`."""
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
