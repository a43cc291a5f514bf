"""JobWorker on a real tiny checkpoint: results match llava.generate, cancel, errors, stop."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from fastllava import LLaVA
from fastllava.preprocess.image_io import ImageLimits
from fastllava.server.jobs import COMPLETED, IN_PROGRESS, IN_QUEUE
from fastllava.server.metrics import Metrics
from fastllava.server.store_sqlite import SqliteJobStore
from fastllava.server.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from fastllava.server.worker import JobWorker
from test_webhooks import Receiver

ENDPOINT = "fal-ai/llavav15-13b"
# With this seed the tiny model emits text from its first token and does not stop within 300
# tokens, so a cancel (or stop) issued at the first output always lands mid-run.
# Greedy, so it really runs long (a sampled run may meet an eos id after ~100 tokens).
LONG_RUN = {"prompt": "Tell a long story.", "max_tokens": 3000, "temperature": 0}


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32",
                                 image_limits=ImageLimits(allow_local_paths=False))


@pytest.fixture(scope="module")
def image_uri():
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(
        buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def run_worker(tmp_path, llava):
    """run_worker(**kw) -> (store, worker, metrics), started; stopped after the test."""
    started = []

    def start(**kw):
        store = SqliteJobStore(tmp_path / "jobs.db", lease_s=5)
        metrics = Metrics()
        worker = JobWorker(store, llava, metrics=metrics, claim_timeout_s=0.1, **kw)
        worker.start()
        started.append((store, worker))
        return store, worker, metrics

    yield start
    for store, worker in started:
        assert worker.stop(timeout_s=30), "worker threads did not stop"
        store.close()


def wait_for(store, job_id, status=COMPLETED, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while (job := store.get(job_id)).status != status:
        assert time.monotonic() < deadline, f"job stuck in {job.status}: {job.logs}"
        time.sleep(0.02)
    return job


def test_job_matches_generate_with_logs_metrics_and_webhook(run_worker, llava, image_uri):
    rx = Receiver()
    try:
        store, worker, metrics = run_worker(webhook_secret="k")
        req = {"image_url": image_uri, "prompt": "Describe the image.", "max_tokens": 12,
               "temperature": 0}
        job = wait_for(store, store.submit(ENDPOINT, "", req, webhook_url=rx.url).id)
        expected = llava.generate(req)
        assert job.error is None and job.result == expected, (job.result, expected)
        assert job.attempts == 1 and job.finished_at >= job.started_at, job
        messages = [x["message"] for x in job.logs if not x["message"].startswith("webhook")]
        assert messages[0].startswith("starting (attempt 1)"), messages
        assert messages[-1].startswith("done in") and "12 tokens" in messages[-1], messages
        assert metrics.requests == {"ok": 1, "error": 0} and metrics.completion_tokens == 12
        assert worker.webhooks.wait_idle(10)
        ((_, headers, raw),) = rx.requests
        assert verify_signature("k", headers[TIMESTAMP_HEADER], raw, headers[SIGNATURE_HEADER])
        body = json.loads(raw)
        assert (body["request_id"], body["status"], body["payload"]) == (job.id, "OK", expected)
        deadline = time.monotonic() + 5       # the delivery outcome is logged on the job
        while "webhook delivered" not in store.get(job.id).logs[-1]["message"]:
            assert time.monotonic() < deadline, store.get(job.id).logs
            time.sleep(0.02)
    finally:
        rx.close()


def test_cancel_mid_run_stops_generation(run_worker, llava, image_uri):
    store, worker, metrics = run_worker()
    req = LONG_RUN | {"image_url": image_uri}
    job_id = store.submit(ENDPOINT, "", req).id
    deadline = time.monotonic() + 60
    while not any(x["message"].startswith("first output") for x in store.get(job_id).logs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert store.request_cancel(job_id) == "CANCELLATION_REQUESTED"
    t0 = time.monotonic()
    job = wait_for(store, job_id)
    assert time.monotonic() - t0 < 5, "cancel was not honoured promptly"
    assert job.error["status_code"] == 499 and job.error["error_type"] == "client_cancelled", job
    assert job.result is None and metrics.requests == {"ok": 0, "error": 1}
    assert metrics.completion_tokens < 300, metrics.completion_tokens
    assert llava.stats()["kv_pages_used"] == 0, "KV pages leaked by the cancel"


def test_bad_jobs_fail_with_422_and_the_worker_goes_on(run_worker, image_uri):
    store, worker, metrics = run_worker()
    bad_image = store.submit(ENDPOINT, "", {"image_url": "data:image/png;base64,bm90IGFuIGltYWdl",
                                            "prompt": "hi", "max_tokens": 4})
    bad_input = store.submit(ENDPOINT, "", {"prompt": "no image", "max_tokens": "4"})
    good = store.submit(ENDPOINT, "", {"image_url": image_uri, "prompt": "hi", "max_tokens": 4})
    err = wait_for(store, bad_image.id).error
    assert err["status_code"] == 422 and err["detail"][0]["loc"] == ["body", "image_url"], err
    assert "image" in err["detail"][0]["type"], err
    err = wait_for(store, bad_input.id).error
    assert err["status_code"] == 422, err
    assert {tuple(d["loc"]) for d in err["detail"]} <= {("body", "image_url"),
                                                        ("body", "max_tokens")}, err
    assert store.get(bad_input.id).logs[-1]["level"] == "ERROR"
    job = wait_for(store, good.id)
    assert job.error is None and job.result["partial"] is False, job
    assert metrics.requests == {"ok": 1, "error": 2}, metrics.requests


def test_stop_releases_the_running_job_to_the_queue(run_worker, llava, image_uri):
    store, worker, _ = run_worker()
    req = LONG_RUN | {"image_url": image_uri}
    job_id = store.submit(ENDPOINT, "", req).id
    wait_for(store, job_id, IN_PROGRESS)
    deadline = time.monotonic() + 60
    while not any(x["message"].startswith("first output") for x in store.get(job_id).logs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.stop(timeout_s=10)
    job = store.get(job_id)
    assert (job.status, job.attempts, job.result, job.error) == (IN_QUEUE, 0, None, None), job
    assert store.queue_position(job_id) == 0
    assert llava.stats()["kv_pages_used"] == 0, "KV pages leaked by stop()"


def test_concurrent_jobs_share_the_engine(run_worker, llava, image_uri):
    """concurrency=4: four queued jobs run at once (all IN_PROGRESS together) and each result
    equals the same request run alone."""
    store, worker, metrics = run_worker(concurrency=4)
    reqs = [{"image_url": image_uri, "prompt": f"Question {i}?", "max_tokens": 200,
             "temperature": 0} for i in range(4)]
    ids = [store.submit(ENDPOINT, "", r).id for r in reqs]
    deadline = time.monotonic() + 60
    seen = 0
    while seen < 4 and time.monotonic() < deadline:
        seen = max(seen, sum(store.get(i).status == IN_PROGRESS for i in ids))
        time.sleep(0.005)
    assert seen == 4, "the four jobs never ran at the same time"
    jobs = [wait_for(store, i) for i in ids]
    assert [j.result for j in jobs] == [llava.generate(r) for r in reqs]
    assert metrics.requests == {"ok": 4, "error": 0}
    assert llava.stats()["kv_pages_used"] == 0


def test_stop_returns_a_job_whose_image_is_loading_at_once(run_worker):
    """A job still fetching its image (a host that never answers) is handed back by stop() at
    once, exactly once, instead of stop() waiting for the image timeout."""
    from serverkit import make_png, serve_images

    host, stop_host = serve_images(make_png())
    try:
        store, worker, _ = run_worker()
        job_id = store.submit(ENDPOINT, "", {"image_url": f"{host.url}/slow.png", "prompt": "hi",
                                             "max_tokens": 4}).id
        deadline = time.monotonic() + 10
        while host.hits.get("/slow.png", 0) < 1:
            assert time.monotonic() < deadline, "the image fetch never started"
            time.sleep(0.01)
        t0 = time.monotonic()
        assert worker.stop(timeout_s=10)
        assert time.monotonic() - t0 < 3, "stop() waited for the image fetch"
        job = store.get(job_id)
        assert (job.status, job.attempts, job.error) == (IN_QUEUE, 0, None), job
        assert [x["message"].split(":")[0] for x in job.logs] == [
            f"starting (attempt 1) on worker {worker.worker_id}", "returned to the queue"], job.logs
    finally:
        stop_host()
