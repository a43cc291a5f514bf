"""Two server processes serving one endpoint from one Redis queue (several GPUs, one endpoint):
jobs submitted to one are answered by either; when one dies mid-job, the other re-runs that job
and finishes the queue; an Idempotency-Key sent to both gives one job. Needs a redis-server
binary (skipped otherwise)."""

from __future__ import annotations

import re
import threading

from test_durability import LONG, SHORT, messages, status, wait_until
from test_idempotency import EP, assert_conflict, submit


def test_two_servers_share_one_redis_queue(server_factory, tiny_llava, data_uri, redis_url):
    queue = ("--queue", redis_url.rsplit("/", 1)[0] + "/1")  # a database of its own
    servers = [server_factory(tiny_llava, *queue) for _ in range(2)]
    first, second = (s.client() for s in servers)
    with first, second:
        endpoint = first.get("/health").json()["endpoint_id"]
        inputs = [LONG | {"image_url": data_uri}] + [
            SHORT | {"image_url": data_uri, "max_tokens": 6 + i} for i in range(5)]
        ids = [first.post(f"/queue/{endpoint}", json=body).json()["request_id"]
               for body in inputs]
        long_id = ids[0]
        wait_until(lambda: any(m.startswith("first output")
                               for m in messages(second, endpoint, long_id)), 60,
                   "a server to start the long job")
        # Worker ids are "<host>-<pid>-<nonce>": find the process running the long job, kill it.
        start = next(m for m in messages(second, endpoint, long_id) if m.startswith("starting"))
        pid = int(re.search(r"-(\d+)-[0-9a-f]+$", start).group(1))
        running = next(s for s in servers if s.proc.pid == pid)
        survivor = second if running is servers[0] else first
        running.kill()                                                   # SIGKILL, mid-job

        wait_until(lambda: all(status(survivor, endpoint, i)["status"] == "COMPLETED"
                               for i in ids), 120, "the surviving server to finish every job")
        for i in ids:
            r = survivor.get(f"/{endpoint}/requests/{i}")
            assert r.status_code == 200 and r.json()["partial"] is False, (i, r.text)
        starts = [m for m in messages(survivor, endpoint, long_id) if m.startswith("starting")]
        assert len(starts) == 2 and "attempt 2" in starts[1], starts
        direct = survivor.post(f"/{endpoint}", json=inputs[0], timeout=120)  # same seeded input
        assert direct.status_code == 200
        assert survivor.get(f"/{endpoint}/requests/{long_id}").json() == direct.json()
        assert survivor.get("/health").json()["queue"] == {"IN_QUEUE": 0, "IN_PROGRESS": 0}


def test_idempotency_key_holds_across_servers_sharing_redis(server_factory, tiny_llava, data_uri,
                                                            redis_url):
    queue = ("--queue", redis_url.rsplit("/", 1)[0] + "/2")
    servers = [server_factory(tiny_llava, *queue) for _ in range(2)]
    body = SHORT | {"image_url": data_uri, "max_tokens": 4}
    ids, lock = [], threading.Lock()

    def race(server):
        with server.client() as client:
            for _ in range(4):
                r = submit(client, body, "shared-key")
                with lock:
                    ids.append(r.json()["request_id"])

    threads = [threading.Thread(target=race, args=(s,)) for s in servers + servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 16 and len(set(ids)) == 1, set(ids)
    with servers[1].client() as client:
        assert_conflict(submit(client, body | {"max_tokens": 5}, "shared-key"), "body")
        wait_until(lambda: status(client, EP, ids[0])["status"] == "COMPLETED", 60, "the job")
        assert client.get("/health").json()["queue"] == {"IN_QUEUE": 0, "IN_PROGRESS": 0}
