"""Restart durability of the real server: submit a burst, SIGKILL the server while a job runs,
start it again on the same SQLite queue; every job completes (or reports its error) exactly once,
and nothing is lost.

Uses the `server_factory` launcher of tests/server/conftest.py (`python -m fastllava serve`).
"""

from __future__ import annotations

import time


# Greedy: on the tiny random model it never meets an eos id, so the job runs all 1500 tokens and
# is mid-generation when the server is killed (a sampled run may stop after ~100 tokens).
LONG = {"prompt": "Tell a long story.", "max_tokens": 1500, "temperature": 0}
SHORT = {"prompt": "Describe the image.", "max_tokens": 16, "temperature": 0}
BAD_IMAGE = "data:image/png;base64,bm90IGFuIGltYWdl"   # "not an image": fails in the worker


def status(client, endpoint, job_id):
    r = client.get(f"/{endpoint}/requests/{job_id}/status", params={"logs": 1})
    assert r.status_code in (200, 202), (r.status_code, r.text)
    return r.json()


def messages(client, endpoint, job_id):
    return [x["message"] for x in status(client, endpoint, job_id)["logs"] or []]


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_mid_job_then_restart_loses_nothing(server_factory, tiny_llava, data_uri,
                                                    tmp_path):
    data_dir = tmp_path / "data"
    args = ("--queue", f"sqlite:///{data_dir / 'jobs.sqlite3'}")
    server = server_factory(tiny_llava, *args, data_dir=data_dir)
    with server.client() as client:
        endpoint = client.get("/health").json()["endpoint_id"]
        inputs = ([SHORT | {"image_url": data_uri, "seed": i} for i in range(2)]
                  + [LONG | {"image_url": data_uri}]
                  + [SHORT | {"image_url": data_uri, "max_tokens": 8 + i} for i in range(4)]
                  + [SHORT | {"image_url": BAD_IMAGE}])
        ids = []
        for body in inputs:
            r = client.post(f"/queue/{endpoint}", json=body)
            assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE", r.text
            ids.append(r.json()["request_id"])
        assert len(set(ids)) == len(ids), ids
        long_id = ids[2]
        # Jobs run concurrently (--queue-concurrency): kill once the first two are done and the
        # long one is generating; the others may be queued, running or done by then.
        wait_until(lambda: any(m.startswith("first output")
                               for m in messages(client, endpoint, long_id))
                   and all(status(client, endpoint, i)["status"] == "COMPLETED" for i in ids[:2]),
                   60, "the long job to start generating and the first two to finish")
        before = {i: client.get(f"/{endpoint}/requests/{i}").json() for i in ids[:2]}
        assert all(b["partial"] is False for b in before.values()), before
    server.kill()                                            # SIGKILL, mid-generation

    server = server_factory(tiny_llava, *args, data_dir=data_dir)
    with server.client() as client:
        wait_until(lambda: all(status(client, endpoint, i)["status"] == "COMPLETED" for i in ids),
                   90, "every job to complete after the restart")
        results = {i: client.get(f"/{endpoint}/requests/{i}") for i in ids}
        logs = {i: messages(client, endpoint, i) for i in ids}
        for i in ids[:-1]:
            r = results[i]
            assert r.status_code == 200 and set(r.json()) == {"output", "partial"}, (i, r.text)
            assert r.json()["partial"] is False, r.text
            assert sum(m.startswith("done in") for m in logs[i]) == 1, (i, logs[i])
        bad = results[ids[-1]]
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image_url"]
        for i, body in before.items():                       # finished before the kill: kept
            assert results[i].json() == body, (results[i].json(), body)
            assert sum(m.startswith("starting") for m in logs[i]) == 1, logs[i]
        starts = [m for m in logs[long_id] if m.startswith("starting")]
        assert [s.split(" on ")[0] for s in starts] == ["starting (attempt 1)",
                                                        "starting (attempt 2)"], logs[long_id]
        # Taken back at once because its process is gone, not after the lease ran out.
        assert any("process died); re-queued" in m for m in logs[long_id]), logs[long_id]
        # The re-run is the same request: it must give the same answer as a direct run.
        direct = client.post(f"/{endpoint}", json=inputs[2], timeout=120)
        assert direct.status_code == 200 and results[long_id].json() == direct.json(), (
            results[long_id].json(), direct.text)
        assert client.get("/health").json()["queue"] == {"IN_QUEUE": 0, "IN_PROGRESS": 0}
