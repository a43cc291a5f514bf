"""The official fal-client package, unchanged, against `fastllava serve` over TLS.

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST at import and hard-codes https://, so each
scenario runs in a subprocess with FAL_RUN_HOST=localhost:<port>,
FAL_QUEUE_RUN_HOST=localhost:<port>/queue (the server's queue API lives under /queue) and
SSL_CERT_FILE=<the trustme CA> (httpx, which fal_client uses, builds its SSL context from
SSL_CERT_FILE when set). FAL_KEY is one of the server's API keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from serverkit import API_KEY, ENV_KEYS

EP = "fal-ai/llavav15-13b"   # the default endpoint id for a LLaVA-1.5 checkpoint

PRELUDE = f"""
import json, sys, time
import fal_client
from fal_client import Completed, FalClientHTTPError, InProgress, Queued
EP = {EP!r}
REQ = json.loads(sys.argv[1])

def wait(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)

def http_error(call):
    try:
        call()
    except FalClientHTTPError as e:
        return [e.status_code, e.error_type, str(e)]
    return None
"""


def run_fal(server, code: str, request: dict, key: str = API_KEY, timeout: float = 120) -> dict:
    """Run `code` (after PRELUDE) with fal_client pointed at `server`; it prints one JSON line."""
    env = {**os.environ, "FAL_RUN_HOST": f"localhost:{server.port}",
           "FAL_QUEUE_RUN_HOST": f"localhost:{server.port}/queue", "SSL_CERT_FILE": server.ca,
           "FAL_KEY": key, "NO_PROXY": "*"}
    for name in ("FAL_KEY_ID", "FAL_KEY_SECRET", "SSL_CERT_DIR"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code),
                           json.dumps(request)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"fal_client script failed ({proc.returncode}):\n{proc.stderr}"
                                  f"\n--- server log ---\n{server.log_text()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def request_(data_uri):
    return {"image_url": data_uri, "prompt": "What is in the image?", "max_tokens": 8,
            "temperature": 0}


def test_subscribe_with_logs_and_queue_updates(strict_server, request_):
    out = run_fal(strict_server, """
        updates = []
        result = fal_client.subscribe(EP, arguments=REQ, with_logs=True,
                                      on_queue_update=updates.append)
        ran = fal_client.run(EP, arguments=REQ)
        print(json.dumps({"result": result, "run": ran,
                          "updates": [[type(u).__name__, getattr(u, "logs", None)] for u in updates]}))
    """, request_)
    result, updates = out["result"], out["updates"]
    assert result["partial"] is False and isinstance(result["output"], str), result
    assert result == out["run"], f"queue result {result} != sync run {out['run']} (greedy)"
    kinds = [k for k, _ in updates]
    assert kinds and kinds[-1] == "Completed", kinds
    assert set(kinds) <= {"Queued", "InProgress", "Completed"}, kinds
    logs = updates[-1][1]
    assert isinstance(logs, list) and logs, f"with_logs=True gave no logs: {updates[-1]}"
    assert all({"message", "level", "source", "timestamp"} <= set(item) for item in logs), logs
    assert any("done" in item["message"] for item in logs), [i["message"] for i in logs]


def test_submit_status_result(strict_server, request_):
    out = run_fal(strict_server, """
        handle = fal_client.submit(EP, arguments=REQ)
        first = handle.status(with_logs=True)
        wait(lambda: isinstance(fal_client.status(EP, handle.request_id), Completed))
        done = fal_client.status(EP, handle.request_id, with_logs=True)
        print(json.dumps({"id": handle.request_id, "first": type(first).__name__,
                          "done_logs": done.logs, "metrics": done.metrics,
                          "result": fal_client.result(EP, handle.request_id),
                          "via_handle": handle.get(), "run": fal_client.run(EP, arguments=REQ)}))
    """, request_)
    assert out["first"] in ("Queued", "InProgress", "Completed"), out["first"]
    assert out["done_logs"], "a completed status with logs=1 has the job's logs"
    assert out["metrics"]["inference_time"] >= 0, out["metrics"]
    assert out["result"] == out["via_handle"] == out["run"], out


def test_cancel_queued_and_running(strict_server, request_):
    long = dict(request_, max_tokens=1500)
    out = run_fal(strict_server, """
        long = fal_client.submit(EP, arguments=REQ)
        short = fal_client.submit(EP, arguments=dict(REQ, max_tokens=4))
        wait(lambda: isinstance(long.status(), InProgress))
        queued_before = type(short.status()).__name__
        short.cancel()                      # still queued behind the long job: dropped
        short_after = type(short.status()).__name__
        t0 = time.monotonic()
        long.cancel()                       # running: stops at its next token
        wait(lambda: isinstance(long.status(), Completed))
        stop_s = time.monotonic() - t0
        print(json.dumps({
            "queued_before": queued_before, "short_after": short_after, "stop_s": stop_s,
            "short_result": http_error(short.get), "long_result": http_error(long.get),
            "cancel_again": http_error(long.cancel),
            "long_status": {"error_type": long.status().error_type}}))
    """, long)
    assert out["queued_before"] == "Queued", out
    assert out["short_after"] == "Completed", out
    assert out["short_result"][:2] == [499, "client_cancelled"], out
    assert out["long_result"][:2] == [499, "client_cancelled"], out
    assert out["long_status"]["error_type"] == "client_cancelled", out
    # 1500 greedy tokens take tens of seconds on this CPU; a cancel must end it within a few.
    assert out["stop_s"] < 10, f"running job took {out['stop_s']:.1f} s to stop after cancel"
    assert out["cancel_again"][0] == 400, f"cancel of a completed job: {out['cancel_again']}"


def test_stream(strict_server, request_):
    out = run_fal(strict_server, """
        events = list(fal_client.stream(EP, arguments=REQ))
        print(json.dumps({"events": events, "run": fal_client.run(EP, arguments=REQ)}))
    """, request_)
    events = out["events"]
    assert events and events[-1]["partial"] is False, events
    assert all(e["partial"] for e in events[:-1]), events
    for prev, cur in zip(events, events[1:]):
        assert cur["output"].startswith(prev["output"]), f"not cumulative: {prev} then {cur}"
    assert events[-1] == out["run"], (events[-1], out["run"])


def test_auth_right_key_env_key_and_wrong_key(strict_server, request_):
    ok = run_fal(strict_server, "print(json.dumps(fal_client.run(EP, arguments=REQ)))",
                 request_, key=ENV_KEYS[1])
    assert ok["partial"] is False, ok
    out = run_fal(strict_server, """
        print(json.dumps({"run": http_error(lambda: fal_client.run(EP, arguments=REQ)),
                          "submit": http_error(lambda: fal_client.submit(EP, arguments=REQ))}))
    """, request_, key="wrong-key")
    assert out["run"][0] == 401 and out["submit"][0] == 401, out
    assert out["run"][1] == "unauthorized", out
