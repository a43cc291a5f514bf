"""Webhooks through the real server: pending deliveries survive a SIGKILL, a slow receiver does
not hold up another's delivery, and the job log never carries a receiver's error text."""

from __future__ import annotations

import json
import re
import threading
import time

from test_durability import SHORT, messages, status, wait_until
from test_webhooks import Receiver, closed_port

from fastllava.server.webhooks import REQUEST_ID_HEADER

EP = "fal-ai/llavav15-13b"
LINE = re.compile(r"webhook delivery failed \(attempt [1-5]/5\)(; giving up)?|"
                  r"webhook delivered \(attempt [1-5]/5\)")


def submit(client, body, hook):
    r = client.post(f"/queue/{EP}", json=body, params={"fal_webhook": hook})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def webhook_lines(client, job_id):
    return [m for m in messages(client, EP, job_id) if m.startswith("webhook")]


def request_ids(requests):
    return [headers[REQUEST_ID_HEADER] for _, headers, _ in requests]


def test_pending_deliveries_survive_sigkill(server_factory, tiny_llava, data_uri, tmp_path):
    gate = threading.Event()
    rx = Receiver(gate=gate)                        # holds every request until the gate opens
    data_dir = tmp_path / "data"
    args = ("--queue", f"sqlite:///{data_dir / 'jobs.sqlite3'}", "--webhook-concurrency", "2")
    server = server_factory(tiny_llava, *args, data_dir=data_dir)
    try:
        with server.client() as client:
            ids = [submit(client, SHORT | {"image_url": data_uri, "max_tokens": 3 + i}, rx.url)
                   for i in range(6)]
            wait_until(lambda: all(status(client, EP, i)["status"] == "COMPLETED" for i in ids)
                       and len(rx.requests) >= 2, 60, "the jobs to finish and 2 deliveries to hang")
        time.sleep(0.3)                             # a bound: no third attempt may start
        assert len(rx.requests) == 2, request_ids(rx.requests)
        in_flight = {i: json.loads(body) for i, (_, _, body) in
                     zip(request_ids(rx.requests), rx.requests)}
        server.kill()                               # 2 deliveries in flight, 4 not yet tried
        gate.set()
        before = len(rx.requests)

        server = server_factory(tiny_llava, *args, data_dir=data_dir)
        with server.client() as client:
            wait_until(lambda: set(request_ids(rx.requests[before:])) == set(ids), 30,
                       "every job's webhook after the restart")
            for _, headers, raw in rx.requests[before:]:   # a repeat is the same delivery
                job_id = headers[REQUEST_ID_HEADER]
                assert json.loads(raw)["request_id"] == job_id
                if job_id in in_flight:
                    assert json.loads(raw) == in_flight[job_id]
            for i in ids:
                wait_until(lambda: webhook_lines(client, i)[-1:] == [
                    f"webhook delivered (attempt {2 if i in in_flight else 1}/5)"], 10,
                    f"the delivery of {i} to be logged")
    finally:
        gate.set()
        rx.close()


def test_slow_receiver_does_not_delay_another_and_logs_keep_no_error_text(
        server_factory, tiny_llava, data_uri):
    server = server_factory(tiny_llava)
    gate = threading.Event()
    slow, fast, refusing = Receiver(gate=gate), Receiver(), Receiver([404])
    try:
        with server.client() as client:
            body = SHORT | {"image_url": data_uri, "max_tokens": 3}
            slow_id = submit(client, body, slow.url)
            wait_until(lambda: slow.requests, 30, "the slow receiver to be called")
            fast_id = submit(client, body, fast.url)
            wait_until(lambda: status(client, EP, fast_id)["status"] == "COMPLETED", 60,
                       "the second job")
            t0 = time.monotonic()
            wait_until(lambda: fast.requests, 5, "the other receiver's webhook (not queued "
                       "behind the slow one)")
            assert time.monotonic() - t0 < 5 and not gate.is_set()
            assert request_ids(fast.requests) == [fast_id]
            # Failures: a port nobody listens on (retried) and a 404 (final). The job log says
            # that an attempt failed, never why: no "refused", no status, no port.
            dead_id = submit(client, body, f"http://127.0.0.1:{closed_port()}/hook")
            gone_id = submit(client, body, refusing.url)
            wait_until(lambda: len(webhook_lines(client, dead_id)) >= 2, 30, "two attempts")
            wait_until(lambda: webhook_lines(client, gone_id), 30, "the 404 attempt")
            assert webhook_lines(client, dead_id)[:2] == [
                "webhook delivery failed (attempt 1/5)", "webhook delivery failed (attempt 2/5)"]
            assert webhook_lines(client, gone_id) == [
                "webhook delivery failed (attempt 1/5); giving up"]
            gate.set()
            wait_until(lambda: webhook_lines(client, slow_id), 30, "the slow delivery")
            for job_id in (slow_id, fast_id, dead_id, gone_id):
                for line in webhook_lines(client, job_id):
                    assert LINE.fullmatch(line), line
    finally:
        gate.set()
        for rx in (slow, fast, refusing):
            rx.close()
