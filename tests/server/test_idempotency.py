"""Idempotency-Key through the real server: the key lives in the job store, so a retried submit
gets the first job back from any server process sharing the queue and after a restart, and the
same key on a different request is a 422 naming the conflict. (Redis: test_redis_shared.py.)"""

from __future__ import annotations

import threading

from test_durability import SHORT

EP = "fal-ai/llavav15-13b"


def submit(client, body, key, *, path="", webhook=None, header="Idempotency-Key"):
    params = {"fal_webhook": webhook} if webhook else None
    return client.post(f"/queue/{EP}{path}", json=body, params=params, headers={header: key})


def assert_conflict(r, differs):
    assert r.status_code == 422, (r.status_code, r.text)
    (item,) = r.json()["detail"]
    assert item["loc"] == ["header", "idempotency-key"], item
    assert item["type"] == "idempotency_key_reused" and "Idempotency-Key" in item["msg"], item
    assert f"another {differs};" in item["msg"], item          # names what differs
    assert r.headers["x-fal-error-type"] == "idempotency_key_reused"


def test_one_job_per_key_across_processes_and_restarts(server_factory, tiny_llava, data_uri,
                                                        tmp_path):
    data_dir = tmp_path / "data"
    queue = ("--queue", f"sqlite:///{data_dir / 'jobs.sqlite3'}")
    body = SHORT | {"image_url": data_uri, "max_tokens": 4}
    first, second = (server_factory(tiny_llava, *queue, data_dir=data_dir) for _ in range(2))
    with first.client() as a, second.client() as b:
        job = submit(a, body, "key-1").json()
        assert job["status"] == "IN_QUEUE", job
        again = submit(a, dict(reversed(body.items())), "key-1").json()   # same request
        assert again["request_id"] == job["request_id"], (job, again)
        # The other server on the same file, with the other header spelling.
        other = submit(b, body, "key-1", header="x-idempotency-key").json()
        assert other["request_id"] == job["request_id"], (job, other)
        # Same key, different request: body, path or webhook.
        assert_conflict(submit(a, body | {"max_tokens": 5}, "key-1"), "body")
        assert_conflict(submit(b, body, "key-1", path="/sub"), "path")
        assert_conflict(submit(a, body, "key-1", webhook="http://127.0.0.1:9/hook"),
                        "fal_webhook")
        # Many clients racing with one new key on two processes: one job.
        ids, lock = [], threading.Lock()

        def race(client):
            for _ in range(4):
                r = submit(client, body, "key-race")
                with lock:
                    ids.append(r.json()["request_id"])

        threads = [threading.Thread(target=race, args=(c,)) for c in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(ids) == 16 and len(set(ids)) == 1, set(ids)
        race_id = ids[0]
    first.kill()                                       # SIGKILL: nothing flushed on the way out
    second.kill()

    restarted = server_factory(tiny_llava, *queue, data_dir=data_dir)
    with restarted.client() as c:
        assert submit(c, body, "key-1").json()["request_id"] == job["request_id"]
        assert submit(c, body, "key-race").json()["request_id"] == race_id
        assert_conflict(submit(c, body | {"prompt": "Another question."}, "key-1"), "body")
        fresh = submit(c, body, "key-2").json()["request_id"]
        assert fresh not in (job["request_id"], race_id)
