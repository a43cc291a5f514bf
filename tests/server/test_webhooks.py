"""Webhook deliveries against a loopback receiver: signature, retries, backoff, give-up."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from fastllava.server.jobs import Job, cancelled_error
from fastllava.server.webhooks import (REQUEST_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
                                       WebhookSender, sign, verify_signature, webhook_body)

SECRET = "s3cret"


class Receiver:
    """Answers POSTs with the scripted status codes (then 200) and records each request."""

    def __init__(self, statuses=(), delay_s=0.0):
        self.statuses, self.delay_s = list(statuses), delay_s
        self.requests: list[tuple[float, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                time.sleep(outer.delay_s)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def deliver():
    """deliver(statuses, **sender_kw) -> (receiver, finished Delivery); runs one delivery."""
    opened = []

    def run(statuses=(), url=None, body=None, **kw):
        rx = Receiver(statuses)
        results = []
        sender = WebhookSender(kw.pop("secret", SECRET), kw.pop("max_attempts", 4),
                               kw.pop("base_delay_s", 0.01), on_result=results.append, **kw)
        opened.extend([rx, sender])
        sender.send(url or rx.url, body or {"request_id": "r1", "status": "OK"}, "r1")
        assert sender.wait_idle(10), "delivery did not finish"
        assert len(results) == 1, results
        return rx, results[0]

    yield run
    for obj in opened:
        obj.close()


def test_signature_verifies(deliver):
    body = {"request_id": "r1", "gateway_request_id": "r1", "status": "OK",
            "payload": {"output": "ünï ✓", "partial": False}, "error": None}
    rx, d = deliver(body=body)
    assert d.delivered and d.attempts == 1 and d.last_status == 200, d
    ((_, headers, raw),) = rx.requests
    assert headers["Content-Type"] == "application/json" and headers[REQUEST_ID_HEADER] == "r1"
    ts, sig = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    assert json.loads(raw) == body and abs(int(ts) - time.time()) < 60, (raw, ts)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64, sig
    assert verify_signature(SECRET, ts, raw, sig)
    assert not verify_signature("other", ts, raw, sig)
    assert not verify_signature(SECRET, ts, raw + b" ", sig)
    assert not verify_signature(SECRET, int(ts) + 1, raw, sig)
    assert not verify_signature(SECRET, ts, raw, sig, now=int(ts) + 301)
    assert verify_signature(SECRET, ts, raw, sig, now=int(ts) + 10**6, tolerance_s=None)
    assert not verify_signature(SECRET, "not-a-number", raw, sig)


def test_no_secret_sends_unsigned(deliver):
    rx, d = deliver(secret=None)
    assert d.delivered and SIGNATURE_HEADER not in rx.requests[0][1], rx.requests[0][1]


def test_retries_5xx_with_growing_backoff_then_succeeds(deliver):
    rx, d = deliver([500, 503, 502], max_attempts=5, base_delay_s=0.05)
    assert (d.delivered, d.attempts, len(rx.requests)) == (True, 4, 4), d
    times = [t for t, _, _ in rx.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # equal jitter: attempt n waits within [base * 2**(n-1) / 2, base * 2**(n-1)]
    for n, gap in enumerate(gaps, 1):
        assert gap >= 0.05 * 2 ** (n - 1) / 2 - 0.005, gaps
    for _, headers, raw in rx.requests:      # every attempt is (re-)signed
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], raw, headers[SIGNATURE_HEADER])


def test_gives_up_after_max_attempts(deliver):
    rx, d = deliver([500] * 10, max_attempts=3)
    assert (d.delivered, d.attempts, d.last_status, len(rx.requests)) == (False, 3, 500, 3), d


@pytest.mark.parametrize("statuses, attempts, delivered", [
    ([400], 1, False), ([404], 1, False), ([301], 1, False),   # final: no retry
    ([429, 200], 2, True), ([408, 200], 2, True),               # retried
])
def test_which_statuses_retry(deliver, statuses, attempts, delivered):
    rx, d = deliver(statuses, max_attempts=4)
    assert (d.delivered, d.attempts, len(rx.requests)) == (delivered, attempts, attempts), d


def test_connection_refused_is_retried_then_given_up(deliver):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    rx, d = deliver(url=f"http://127.0.0.1:{port}/x", max_attempts=3)
    assert (d.delivered, d.attempts, d.last_status) == (False, 3, None), d
    assert "Connect" in d.last_error, d.last_error


def test_private_target_refused_when_not_allowed(deliver):
    rx, d = deliver(allow_private=False)
    assert (d.delivered, d.attempts, rx.requests) == (False, 1, []), d
    assert "non-public" in d.last_error, d.last_error


def test_send_never_blocks_on_a_slow_receiver():
    rx = Receiver(delay_s=1.0)
    sender = WebhookSender(SECRET, 2, 0.01)
    try:
        t0 = time.monotonic()
        for i in range(3):
            sender.send(rx.url, {"n": i}, f"r{i}")
        assert time.monotonic() - t0 < 0.2, time.monotonic() - t0
    finally:
        sender.close(timeout_s=0.1)
        rx.close()


def test_webhook_body_shapes():
    job = Job(id="j1", endpoint="o/a", path="", input={}, result={"output": "x", "partial": False})
    assert webhook_body(job) == {"request_id": "j1", "gateway_request_id": "j1", "status": "OK",
                                 "payload": {"output": "x", "partial": False}, "error": None}
    job.result, job.error = None, cancelled_error()
    assert webhook_body(job) == {
        "request_id": "j1", "gateway_request_id": "j1", "status": "ERROR",
        "payload": {"detail": cancelled_error()["detail"], "error_type": "client_cancelled"},
        "error": "Invalid status code: 499"}
    assert sign(SECRET, 1, b"{}") == sign(SECRET.encode(), "1", b"{}") != sign(SECRET, 2, b"{}")
