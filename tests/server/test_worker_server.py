"""The queue worker through the real server (`python -m fastllava serve` on loopback):

- slow image hosts never stall the queue: images load in a pool of their own
  (--image-fetch-concurrency) before a job takes one of the --queue-concurrency engine slots;
- a graceful stop (SIGTERM) hands each running job back to the queue exactly once, and a
  restarted server completes each exactly once.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time

ENDPOINT = "fal-ai/llavav15-13b"
SHORT = {"prompt": "Describe the image.", "max_tokens": 8, "temperature": 0}
# Greedy on the tiny random model: never meets an eos id, so it runs all max_tokens.
LONG = {"prompt": "Tell a long story.", "max_tokens": 2000, "temperature": 0}


def submit(client, body) -> str:
    r = client.post(f"/queue/{ENDPOINT}", json=body)
    assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE", r.text
    return r.json()["request_id"]


def status(client, job_id) -> dict:
    r = client.get(f"/{ENDPOINT}/requests/{job_id}/status", params={"logs": 1})
    assert r.status_code in (200, 202), r.text
    return r.json()


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_slow_images_do_not_stall_the_queue(server_factory, tiny_llava, image_host, data_uri):
    """As many never-answering image URLs as there are engine slots (--queue-concurrency, 16 by
    default) are queued first; a job with a ready image behind them completes long before the
    slow fetches time out."""
    timeout_s = 30.0
    server = server_factory(tiny_llava, "--allow-private-image-hosts",
                            "--image-timeout-s", str(timeout_s))
    slow_url = f"{image_host.url}/slow.png"
    before = image_host.hits.get("/slow.png", 0)
    with server.client() as client:
        slow = [submit(client, SHORT | {"image_url": slow_url, "seed": i}) for i in range(16)]
        wait_until(lambda: image_host.hits.get("/slow.png", 0) - before == 16, 10,
                   "all 16 slow fetches to start")
        t0 = time.monotonic()
        fast = [submit(client, SHORT | {"image_url": data_uri}),
                submit(client, SHORT | {"image_url": f"{image_host.url}/img.png"})]
        for job_id in fast:
            wait_until(lambda: status(client, job_id)["status"] == "COMPLETED", timeout_s / 2,
                       "the jobs with ready images to complete")
            r = client.get(f"/{ENDPOINT}/requests/{job_id}")
            assert r.status_code == 200 and r.json()["partial"] is False, r.text
        assert time.monotonic() - t0 < timeout_s / 2
        assert all(status(client, i)["status"] == "IN_PROGRESS" for i in slow), \
            "the slow jobs should still be fetching"


def test_image_fetch_concurrency_bounds_the_claimed_jobs(server_factory, tiny_llava, image_host,
                                                          data_uri):
    """--image-fetch-concurrency 3: three slow fetches at once, the fourth slow job stays queued,
    and a job whose image loads fast still gets an engine slot once a fetch slot frees."""
    server = server_factory(tiny_llava, "--allow-private-image-hosts", "--image-timeout-s", "3",
                            "--image-fetch-concurrency", "3", "--queue-concurrency", "1")
    slow_url = f"{image_host.url}/slow.png"
    before = image_host.hits.get("/slow.png", 0)
    with server.client() as client:
        slow = [submit(client, SHORT | {"image_url": slow_url, "seed": i}) for i in range(4)]
        wait_until(lambda: image_host.hits.get("/slow.png", 0) - before == 3, 10,
                   "three slow fetches to start")
        time.sleep(0.5)
        assert image_host.hits.get("/slow.png", 0) - before == 3, "more fetches than the bound"
        assert [status(client, i)["status"] for i in slow] == ["IN_PROGRESS"] * 3 + ["IN_QUEUE"]
        fast = submit(client, SHORT | {"image_url": data_uri})
        for job_id in slow + [fast]:
            wait_until(lambda: status(client, job_id)["status"] == "COMPLETED", 30,
                       "every job to complete")
        errors = [client.get(f"/{ENDPOINT}/requests/{i}").json() for i in slow]
        assert all(e["detail"][0]["type"] == "image_load_error" for e in errors), errors
        assert client.get(f"/{ENDPOINT}/requests/{fast}").json()["partial"] is False


def _jobs_on_disk(path, ids) -> dict[str, dict]:
    with sqlite3.connect(path) as db:
        rows = db.execute(f"SELECT id, status, attempts, logs FROM jobs WHERE id IN "
                          f"({','.join('?' * len(ids))})", ids).fetchall()
    return {i: {"status": s, "attempts": a, "logs": [x["message"] for x in json.loads(logs)]}
            for i, s, a, logs in rows}


def test_sigterm_returns_each_running_job_once(server_factory, tiny_llava, data_uri, tmp_path):
    db_path = tmp_path / "data" / "jobs.sqlite3"
    args = ("--queue", f"sqlite:///{db_path}", "--log-level", "info")
    server = server_factory(tiny_llava, *args, data_dir=tmp_path / "data")
    with server.client() as client:
        ids = [submit(client, LONG | {"image_url": data_uri, "seed": i}) for i in range(3)]
        wait_until(lambda: all(any(x["message"].startswith("first output")
                                   for x in status(client, i)["logs"] or []) for i in ids),
                   60, "the three jobs to generate")
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)       # uvicorn re-raises the signal after its graceful shutdown
    log_text = server.log_text()
    assert "Application shutdown complete" in log_text, log_text
    jobs = _jobs_on_disk(db_path, ids)
    for i in ids:
        job = jobs[i]
        assert (job["status"], job["attempts"]) == ("IN_QUEUE", 0), job
        assert sum(m.startswith("starting") for m in job["logs"]) == 1, job["logs"]
        assert sum(m.startswith("returned to the queue") for m in job["logs"]) == 1, job["logs"]
        assert len(re.findall(rf"job {i} returned to the queue", log_text)) == 1, log_text

    server = server_factory(tiny_llava, *args, data_dir=tmp_path / "data")
    with server.client() as client:
        for i in ids:
            wait_until(lambda: status(client, i)["status"] == "COMPLETED", 600,
                       "the returned jobs to complete after the restart")
    server.stop()
    for i, job in _jobs_on_disk(db_path, ids).items():
        assert (job["status"], job["attempts"]) == ("COMPLETED", 1), job
        assert sum(m.startswith("done in") for m in job["logs"]) == 1, job["logs"]
        assert sum(m.startswith("starting") for m in job["logs"]) == 2, job["logs"]
        assert sum(m.startswith("returned to the queue") for m in job["logs"]) == 1, job["logs"]
