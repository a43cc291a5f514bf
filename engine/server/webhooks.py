"""Signed webhook deliveries with bounded retries (fal's `?fal_webhook=` callback).

Body (JSON, UTF-8), as fal sends it:
    {"request_id": id, "gateway_request_id": id, "status": "OK", "payload": <result>, "error": null}
    {"request_id": id, "gateway_request_id": id, "status": "ERROR",
     "payload": {"detail": ..., "error_type": ...}, "error": "Invalid status code: 422"}

Headers:
    Content-Type: application/json
    X-Fastllava-Request-Id: <request id>
    X-Fastllava-Timestamp: <unix seconds, integer, the time of this attempt>
    X-Fastllava-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.".encode() + raw_body)>
The signature header is sent only when a secret is configured. A receiver recomputes the HMAC over
the timestamp header, a ".", and the raw body bytes exactly as received (before any JSON parsing),
compares in constant time and rejects stale timestamps (replays): `verify_signature` does this.

Retries. Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
(base_delay_s * 2**(attempt-1), capped at max_delay_s, with "equal jitter": half fixed, half
random; a Retry-After of whole seconds on 429/503 is honoured up to max_delay_s) until
max_attempts attempts were made. Any other status (2xx success; 3xx — redirects are not
followed — and other 4xx) is final. Each attempt is re-signed with a fresh timestamp.

Deliveries run on one background thread, ordered by due time, so a slow receiver never blocks
the job worker. They are kept in memory only: deliveries pending when the process stops are lost
(the job's result itself is durable and stays retrievable).

Private addresses. A self-hosted server often calls back into its own network, so webhooks to
loopback/private hosts are allowed by default; with allow_private=False every address the host
resolves to must be public, and the connection is made to the checked address (the Host header
and TLS server name keep the original name), so DNS rebinding cannot redirect it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from fastllava.preprocess.image_io import is_public_address

from .jobs import Job

log = logging.getLogger("fastllava.webhooks")
SIGNATURE_HEADER, TIMESTAMP_HEADER = "X-Fastllava-Signature", "X-Fastllava-Timestamp"
REQUEST_ID_HEADER = "X-Fastllava-Request-Id"
_RETRY_STATUS = frozenset({408, 429})


def webhook_body(job: Job) -> dict[str, Any]:
    """The delivery body for a COMPLETED job (fal's shape)."""
    body = {"request_id": job.id, "gateway_request_id": job.id}
    if job.error is None:
        return {**body, "status": "OK", "payload": job.result, "error": None}
    err = job.error
    return {**body, "status": "ERROR",
            "payload": {"detail": err.get("detail"), "error_type": err.get("error_type")},
            "error": f"Invalid status code: {err.get('status_code')}"}


def sign(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The X-Fastllava-Signature value: "sha256=" + hex HMAC-SHA256 over b"<timestamp>." + body."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, timestamp: str | int, body: bytes | str, header: str,
                     *, tolerance_s: float | None = 300.0, now: float | None = None) -> bool:
    """For receivers: True when the delivery is authentic and fresh, else False (never raises).

    secret: the server's --webhook-secret (str is UTF-8 encoded, or bytes).
    timestamp: the X-Fastllava-Timestamp header value (unix seconds; str or int).
    body: the request body exactly as received, before any JSON parsing (bytes; a str is UTF-8
        encoded, which only round-trips if nothing re-serialized it).
    header: the X-Fastllava-Signature header value, "sha256=<hex>" (compared in constant time).
    tolerance_s: the largest |now - timestamp| accepted, in seconds (replay protection); None
        skips the freshness check. now: the current unix time (tests), default time.time().

        ok = verify_signature(secret, request.headers["X-Fastllava-Timestamp"], raw_body,
                              request.headers.get("X-Fastllava-Signature", ""))
    """
    if isinstance(body, str):
        body = body.encode()
    try:
        ts = int(str(timestamp))
    except ValueError:
        return False
    if tolerance_s is not None and abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return isinstance(header, str) and hmac.compare_digest(sign(secret, ts, body), header)


@dataclasses.dataclass(order=True)
class Delivery:
    due: float                                   # time.monotonic() of the next attempt
    seq: int                                     # FIFO among equal due times
    url: str = dataclasses.field(compare=False)
    request_id: str = dataclasses.field(compare=False)
    body: bytes = dataclasses.field(compare=False)
    attempts: int = dataclasses.field(default=0, compare=False)
    last_status: int | None = dataclasses.field(default=None, compare=False)
    last_error: str | None = dataclasses.field(default=None, compare=False)
    delivered: bool = dataclasses.field(default=False, compare=False)


def _pin_public(url: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Resolve url's host, require every address to be public, and return the URL rewritten to
    the first address with the Host header and TLS server name that keep the original name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addrs = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    if not addrs or not all(is_public_address(a) for a in addrs):
        # Never name the resolved address: the message reaches the job's logs.
        raise PermissionError(f"webhook host {host!r} resolves to a non-public address; "
                              "private webhook targets are not allowed")
    ip = sorted(addrs)[0].split("%", 1)[0]
    netloc_ip = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    pinned = urlunsplit(parts._replace(netloc=f"{netloc_ip}:{port}"))
    host_header = parts.netloc.rpartition("@")[2]
    return pinned, {"Host": host_header}, {"sni_hostname": host}


class WebhookSender:
    """Queues deliveries and sends them from one background thread (started on first send).

    on_result(delivery) is called (on that thread) once per delivery when it succeeds or is given
    up; delivery.delivered tells which."""

    def __init__(self, secret: str | None, max_attempts: int = 5, base_delay_s: float = 1.0, *,
                 max_delay_s: float = 60.0, timeout_s: float = 10.0, allow_private: bool = True,
                 on_result: Callable[[Delivery], None] | None = None):
        if max_attempts < 1 or base_delay_s < 0 or max_delay_s < 0 or not timeout_s > 0:
            raise ValueError(f"bad webhook settings: max_attempts={max_attempts!r} (>= 1), "
                             f"base_delay_s={base_delay_s!r}, max_delay_s={max_delay_s!r} (>= 0), "
                             f"timeout_s={timeout_s!r} (> 0)")
        self.secret, self.max_attempts = secret, max_attempts
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.allow_private, self.on_result = allow_private, on_result
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False,
                                    trust_env=allow_private)
        self._heap: list[Delivery] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._busy = 0                     # deliveries taken off the heap, being attempted
        self._closed = False
        self._thread: threading.Thread | None = None

    def send(self, url: str, body: dict[str, Any], request_id: str) -> None:
        """Queue one delivery; returns at once."""
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        with self._cond:
            if self._closed:
                raise RuntimeError("WebhookSender is closed")
            self._seq += 1
            heapq.heappush(self._heap, Delivery(time.monotonic(), self._seq, url, request_id, raw))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fastllava-webhooks",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no delivery is pending (tests, graceful shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; deliveries still pending are dropped (and logged)."""
        with self._cond:
            self._closed = True
            dropped, self._heap = self._heap, []
            self._cond.notify_all()
        for d in dropped:
            log.warning("webhook for %s to %s dropped at shutdown after %d attempt(s)",
                        d.request_id, d.url, d.attempts)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._client.close()

    # ---- delivery thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or
                                            self._heap[0].due > time.monotonic()):
                    self._cond.wait(self._heap[0].due - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                d = heapq.heappop(self._heap)
                self._busy += 1
            retry_in = self._attempt(d)
            with self._cond:
                self._busy -= 1
                if retry_in is not None and not self._closed:
                    d.due = time.monotonic() + retry_in
                    heapq.heappush(self._heap, d)
                self._cond.notify_all()
            if retry_in is None and self.on_result is not None:
                try:
                    self.on_result(d)
                except Exception:
                    log.exception("webhook on_result callback failed")

    def _attempt(self, d: Delivery) -> float | None:
        """One POST. Returns the delay before the next attempt, or None when final."""
        d.attempts += 1
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: d.request_id,
                   TIMESTAMP_HEADER: ts}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, ts, d.body)
        retry_after = None
        try:
            url, extensions = d.url, {}
            if not self.allow_private:
                url, host, extensions = _pin_public(d.url)
                headers.update(host)
            resp = self._client.post(url, content=d.body, headers=headers, extensions=extensions)
            d.last_status, d.last_error = resp.status_code, None
            if resp.status_code < 300:
                d.delivered = True
                return None
            retryable = resp.status_code >= 500 or resp.status_code in _RETRY_STATUS
            if resp.status_code in (429, 503) and resp.headers.get("retry-after", "").isdigit():
                retry_after = float(resp.headers["retry-after"])
        except PermissionError as e:            # refused by policy: final
            d.last_status, d.last_error, retryable = None, str(e), False
        except (httpx.HTTPError, OSError, ValueError) as e:
            d.last_status, d.last_error, retryable = None, f"{type(e).__name__}: {e}", True
        if not retryable or d.attempts >= self.max_attempts:
            log.warning("webhook for %s to %s failed after %d attempt(s): %s", d.request_id,
                        d.url, d.attempts, d.last_error or f"HTTP {d.last_status}")
            return None
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (d.attempts - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        return delay if retry_after is None else min(self.max_delay_s, max(delay, retry_after))
