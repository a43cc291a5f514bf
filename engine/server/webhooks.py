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

Durable, concurrent. The job store queues a job's delivery in the transaction that completes
the job, and keeps its attempt count and next due time, so a crash or restart loses none: the
restarted server (or a sibling on a shared store) resumes them. Delivery is at least once: an
attempt cut off by a crash is made again, with the same X-Fastllava-Request-Id (receivers
dedupe on it). Up to `concurrency` attempts run at once, on their own threads, so one slow
receiver never delays another's delivery nor the job worker. Each attempt is logged on the job
as "webhook delivered (attempt n/5)" or "webhook delivery failed (attempt n/5)", never with the
receiver's error (that text would make webhooks a port scanner); the server log has it.

Private addresses. A self-hosted server often calls back into its own network, so webhooks to
loopback/private hosts are allowed by default; with allow_private=False every address the host
resolves to must be public, and the connection is made to the checked address (the Host header
and TLS server name keep the original name), so DNS rebinding cannot redirect it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from fastllava.preprocess.image_io import is_public_address

from .jobs import Job, WebhookClaim
from .serverlog import redact_webhook

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


@dataclasses.dataclass
class Delivery:
    """What one attempt gave (on_result gets the final one). last_error: the transport error or
    policy refusal, for the server log only, never for the job log (a receiver's error text
    would make webhooks a port scanner)."""
    request_id: str
    url: str
    attempts: int                       # this attempt's number, counted across restarts
    last_status: int | None = None      # the receiver's HTTP status
    last_error: str | None = None
    delivered: bool = False
    refused: bool = False               # not sent: the host is private and that is refused


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
    """Delivers the webhooks the job store queues (JobStore.claim_webhooks) on up to
    `concurrency` threads, so a slow receiver holds one thread and never delays the others.

    start() begins claiming (pending deliveries of earlier runs included); wake() after a job
    finished in this process skips the poll delay; close() waits for attempts in flight.
    on_result(delivery) is called once per delivery this process finishes (sent or given up)."""

    def __init__(self, store, secret: str | None, max_attempts: int = 5,
                 base_delay_s: float = 1.0, *, max_delay_s: float = 60.0, timeout_s: float = 10.0,
                 allow_private: bool = True, concurrency: int = 8, poll_s: float = 0.2,
                 on_result: Callable[[Delivery], None] | None = None):
        if (max_attempts < 1 or base_delay_s < 0 or max_delay_s < 0 or not timeout_s > 0
                or concurrency < 1 or not poll_s > 0):
            raise ValueError(f"bad webhook settings: max_attempts={max_attempts!r}, "
                             f"concurrency={concurrency!r} (>= 1), base_delay_s={base_delay_s!r}, "
                             f"max_delay_s={max_delay_s!r} (>= 0), timeout_s={timeout_s!r}, "
                             f"poll_s={poll_s!r} (> 0)")
        self.store, self.secret, self.max_attempts = store, secret, max_attempts
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.allow_private, self.on_result = allow_private, on_result
        self.concurrency, self.poll_s = concurrency, poll_s
        # httpx's timeout bounds each connect / write / read, not the whole attempt: a claim
        # outlives a few of them before another process may take the delivery over.
        self.lease_s = 4 * timeout_s + 5.0
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False,
                                    trust_env=allow_private)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fastllava-webhook")
        self._cond = threading.Condition()
        self._busy = 0                     # claims handed to the pool, not finished
        self._woken = self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="fastllava-webhooks",
                                            daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """A delivery was just queued by this process: claim it now, not at the next poll."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no delivery is pending in the store or in flight here; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                idle = self._busy == 0
            if idle and self.store.webhooks_pending() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop claiming; wait up to timeout_s for attempts in flight. Deliveries not finished
        stay in the store for the next start (or a sibling server sharing it)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._cond.wait_for(lambda: self._busy == 0, max(0.0, deadline - time.monotonic()))
            idle = self._busy == 0
        self._pool.shutdown(wait=False)
        if idle:          # else an attempt still runs on a daemon thread and needs the client
            self._client.close()

    # ---- threads ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._busy < self.concurrency)
                if self._closed:
                    return
                free, self._woken = self.concurrency - self._busy, False
            try:
                claims = self.store.claim_webhooks(free, self.lease_s)
            except Exception:
                log.exception("claiming webhook deliveries failed; retrying")
                claims = []
            with self._cond:
                self._busy += len(claims)
            for claim in claims:
                try:
                    self._pool.submit(self._deliver, claim)
                except RuntimeError:      # closed meanwhile: _deliver hands the claim back
                    self._deliver(claim)
            if len(claims) < free:        # nothing more due now: wait for a poll or a wake
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._woken, self.poll_s)

    def _deliver(self, claim: WebhookClaim) -> None:
        try:
            if self._closed:              # stopping: hand the claim back untried
                self.store.webhook_attempted(claim, time.time(), None)
                return
            d, retry_in = self._attempt(claim)
            tried = f"attempt {min(d.attempts, self.max_attempts)}/{self.max_attempts}"
            if d.delivered:
                line = (f"webhook delivered ({tried})", "INFO")
            elif d.refused:
                line = ("webhook delivery refused: this server does not call private hosts",
                        "WARN")
            else:
                final = "" if retry_in is not None else "; giving up"
                line = (f"webhook delivery failed ({tried}){final}", "WARN")
            retry_at = None if retry_in is None else time.time() + retry_in
            if self.store.webhook_attempted(claim, retry_at, line) and retry_at is None \
                    and self.on_result is not None:
                self.on_result(d)
        except Exception:
            log.exception("webhook delivery for %s failed", claim.job.id)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _attempt(self, claim: WebhookClaim) -> tuple[Delivery, float | None]:
        """One POST → (what happened, the delay before the next attempt or None when final)."""
        job = claim.job
        d = Delivery(job.id, job.webhook_url or "", claim.attempt)
        if d.attempts > self.max_attempts:    # its last attempts died with their process
            d.last_error = "no attempts left"
            return d, None
        body = json.dumps(webhook_body(job), separators=(",", ":"), ensure_ascii=False).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: job.id,
                   TIMESTAMP_HEADER: ts}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, ts, body)
        retry_after = None
        try:
            url, extensions = d.url, {}
            if not self.allow_private:
                url, host, extensions = _pin_public(d.url)
                headers.update(host)
            # The response body is never read: a receiver cannot make it cost memory or time.
            with self._client.stream("POST", url, content=body, headers=headers,
                                     extensions=extensions) as resp:
                d.last_status = resp.status_code
                retry_header = resp.headers.get("retry-after", "")
            if d.last_status < 300:
                d.delivered = True
                return d, None
            retryable = d.last_status >= 500 or d.last_status in _RETRY_STATUS
            if d.last_status in (429, 503) and retry_header.isdigit():
                retry_after = float(retry_header)
        except PermissionError as e:            # refused by policy: final
            d.last_error, d.refused, retryable = str(e), True, False
        except (httpx.HTTPError, OSError, ValueError) as e:
            d.last_error, retryable = f"{type(e).__name__}: {e}", True
        if not retryable or d.attempts >= self.max_attempts:
            log.warning("webhook for %s to %s failed after %d attempt(s): %s", job.id,
                        redact_webhook(d.url), d.attempts,
                        d.last_error or f"HTTP {d.last_status}")
            return d, None
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (d.attempts - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        return d, (delay if retry_after is None else min(self.max_delay_s,
                                                          max(delay, retry_after)))
