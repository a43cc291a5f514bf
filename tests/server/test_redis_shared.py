"""Two server processes serving one endpoint from one Redis queue (several GPUs, one endpoint):
jobs submitted to one are answered by either; when one dies mid-job, the other re-runs that job
and finishes the queue. Needs a redis-server binary (skipped otherwise)."""

from __future__ import annotations

import re

from test_durability import LONG, SHORT, messages, status, wait_until


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
