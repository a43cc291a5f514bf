"""Webhook deliveries against a loopback receiver: signature, retries, backoff, give-up."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time

import pytest

from fastllava.server.jobs import Job, cancelled_error
from fastllava.server.store_sqlite import SqliteJobStore
from fastllava.server.webhooks import (REQUEST_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
                                       WebhookSender, sign, verify_signature, webhook_body)

SECRET = "s3cret"


class Receiver:
    """Answers POSTs with the scripted status codes (then 200) and records each request (on
    arrival). delay_s: answer that late; gate: an Event to wait for (up to 60 s) first."""

    def __init__(self, statuses=(), delay_s=0.0, gate=None):
        self.statuses, self.delay_s, self.gate = list(statuses), delay_s, gate
        self.requests: list[tuple[float, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                time.sleep(outer.delay_s)
                if outer.gate is not None:
                    outer.gate.wait(60)
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


RESULT = {"output": "ünï ✓", "partial": False}


def finished_job(store, url, result=RESULT, error=None):
    """A job with a webhook to `url`, completed: its delivery is now pending in the store."""
    job = store.submit("o/a", "", {"prompt": "p"}, webhook_url=url)
    store.claim("w", timeout_s=0)
    assert store.complete(job.id, result=result, error=error)
    return job.id


@pytest.fixture
def stores(tmp_path):
    """stores() -> a new SqliteJobStore on this test's file (each like another process's)."""
    opened = []

    def make(**kw):
        opened.append(SqliteJobStore(tmp_path / "jobs.db", **kw))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def deliver(stores):
    """deliver(statuses, **sender_kw) -> (receiver, finished Delivery, store, job id)."""
    opened = []

    def run(statuses=(), url=None, **kw):
        rx, store, results = Receiver(statuses), stores(), []
        sender = WebhookSender(store, kw.pop("secret", SECRET), kw.pop("max_attempts", 4),
                               kw.pop("base_delay_s", 0.01), on_result=results.append, **kw)
        opened.extend([rx, sender])
        job_id = finished_job(store, url or rx.url)
        sender.start()
        assert sender.wait_idle(10), "delivery did not finish"
        assert len(results) == 1, results
        return rx, results[0], store, job_id

    yield run
    for obj in opened:
        obj.close()


def webhook_lines(store, job_id):
    return [x["message"] for x in store.get(job_id).logs if x["message"].startswith("webhook")]


def test_signature_verifies(deliver):
    rx, d, store, job_id = deliver()
    assert d.delivered and d.attempts == 1 and d.last_status == 200, d
    ((_, headers, raw),) = rx.requests
    assert headers["Content-Type"] == "application/json" and headers[REQUEST_ID_HEADER] == job_id
    body = {"request_id": job_id, "gateway_request_id": job_id, "status": "OK",
            "payload": RESULT, "error": None}
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
    assert webhook_lines(store, job_id) == ["webhook delivered (attempt 1/4)"]
    assert store.webhooks_pending() == 0


def test_no_secret_sends_unsigned(deliver):
    rx, d, _, _ = deliver(secret=None)
    assert d.delivered and SIGNATURE_HEADER not in rx.requests[0][1], rx.requests[0][1]


def test_retries_5xx_with_growing_backoff_then_succeeds(deliver):
    rx, d, store, job_id = deliver([500, 503, 502], max_attempts=5, base_delay_s=0.05)
    assert (d.delivered, d.attempts, len(rx.requests)) == (True, 4, 4), d
    times = [t for t, _, _ in rx.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # equal jitter: attempt n waits within [base * 2**(n-1) / 2, base * 2**(n-1)]
    for n, gap in enumerate(gaps, 1):
        assert gap >= 0.05 * 2 ** (n - 1) / 2 - 0.005, gaps
    for _, headers, raw in rx.requests:      # every attempt is (re-)signed
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], raw, headers[SIGNATURE_HEADER])
    assert webhook_lines(store, job_id) == [
        "webhook delivery failed (attempt 1/5)", "webhook delivery failed (attempt 2/5)",
        "webhook delivery failed (attempt 3/5)", "webhook delivered (attempt 4/5)"]


def test_gives_up_after_max_attempts(deliver):
    rx, d, store, job_id = deliver([500] * 10, max_attempts=3)
    assert (d.delivered, d.attempts, d.last_status, len(rx.requests)) == (False, 3, 500, 3), d
    assert webhook_lines(store, job_id)[-1] == "webhook delivery failed (attempt 3/3); giving up"
    assert store.webhooks_pending() == 0


@pytest.mark.parametrize("statuses, attempts, delivered", [
    ([400], 1, False), ([404], 1, False), ([301], 1, False),   # final: no retry
    ([429, 200], 2, True), ([408, 200], 2, True),               # retried
])
def test_which_statuses_retry(deliver, statuses, attempts, delivered):
    rx, d, _, _ = deliver(statuses, max_attempts=4)
    assert (d.delivered, d.attempts, len(rx.requests)) == (delivered, attempts, attempts), d


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # closed again: nothing listens there


def test_connection_refused_is_retried_then_given_up_without_the_error_in_the_job_log(deliver):
    rx, d, store, job_id = deliver(url=f"http://127.0.0.1:{closed_port()}/x", max_attempts=3)
    assert (d.delivered, d.attempts, d.last_status) == (False, 3, None), d
    assert "Connect" in d.last_error, d.last_error           # kept for the server log
    # The job log (readable by clients) says only that an attempt failed: not why (refused,
    # reset, timeout, an HTTP status) -- that would make webhooks a port scanner.
    assert webhook_lines(store, job_id) == ["webhook delivery failed (attempt 1/3)",
                                            "webhook delivery failed (attempt 2/3)",
                                            "webhook delivery failed (attempt 3/3); giving up"]


def test_server_log_names_the_target_without_its_credentials(deliver, caplog):
    """The give-up warning names host, port and path; never userinfo or query (receivers take
    tokens there), which are still sent."""
    port = closed_port()
    url = f"http://hook-user:hook-secret@127.0.0.1:{port}/x?token=q-secret#frag"
    with caplog.at_level(logging.WARNING, logger="fastllava.webhooks"):
        rx, d, _, _ = deliver(url=url, max_attempts=1)
    (record,) = [r for r in caplog.records if "failed after" in r.getMessage()]
    line = record.getMessage()
    assert f"http://127.0.0.1:{port}/x?***" in line, line
    assert "secret" not in line and "hook-user" not in line, line


def test_private_target_refused_when_not_allowed(deliver):
    rx, d, store, job_id = deliver(allow_private=False)
    assert (d.delivered, d.attempts, rx.requests) == (False, 1, []), d
    assert "non-public" in d.last_error, d.last_error
    (line,) = webhook_lines(store, job_id)
    assert "refused" in line and "127.0.0.1" not in line, line


def test_a_slow_receiver_does_not_delay_another(stores):
    slow, fast = Receiver(delay_s=3.0), Receiver()
    store, seen = stores(), {}
    sender = WebhookSender(store, SECRET, 2, 0.01, concurrency=2,
                           on_result=lambda d: seen.setdefault(d.request_id, time.monotonic()))
    try:
        slow_id = finished_job(store, slow.url)
        fast_id = finished_job(store, fast.url)
        t0 = time.monotonic()
        sender.start()
        assert sender.wait_idle(10)
        assert seen[fast_id] - t0 < 1.0 and seen[slow_id] - t0 >= 2.9, (seen, t0)
    finally:
        sender.close(timeout_s=0.1)
        slow.close()
        fast.close()


def test_pending_deliveries_outlive_their_sender(stores):
    """A sender that stops (or dies) mid-backoff leaves the delivery in the store; the next one
    (another process, after a restart) resumes it, counting attempts on."""
    rx = Receiver([500])
    first, results = stores(), []
    sender = WebhookSender(first, SECRET, 5, 1.0)           # next attempt in 0.5-1 s
    job_id = finished_job(first, rx.url)
    sender.start()
    deadline = time.monotonic() + 10
    while not webhook_lines(first, job_id):
        assert time.monotonic() < deadline, "no first attempt"
        time.sleep(0.02)
    sender.close()
    assert first.webhooks_pending() == 1 and len(rx.requests) == 1
    again = WebhookSender(stores(), SECRET, 5, 0.01, on_result=results.append)
    try:
        again.start()
        assert again.wait_idle(10)
        ((d,),) = (results,)
        assert (d.delivered, d.attempts, len(rx.requests)) == (True, 2, 2), d
        assert rx.requests[0][1][REQUEST_ID_HEADER] == rx.requests[1][1][REQUEST_ID_HEADER]
    finally:
        again.close()
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
