"""The JobStore contract, run against both backends: SqliteJobStore and RedisJobStore.

Redis tests start a throwaway `redis-server` (no persistence) on a free port when the binary is
installed, and are skipped otherwise. Each test gets fresh storage: a new SQLite file, or a new
key prefix on the shared Redis. `make(**kw)` opens another store on the same storage, which is
how several processes see it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fastllava.server.jobs import (COMPLETED, IN_PROGRESS, IN_QUEUE, IdempotencyConflict,
                                   StoreUnavailable)
from fastllava.server.stores import open_store
from test_startup_checks import sqlite_file


@pytest.fixture(params=["sqlite", "redis"])
def make(request, tmp_path):
    """make(**kw) -> a new store on this test's storage; all are closed after the test."""
    opened = []
    if request.param == "sqlite":
        url, extra = f"sqlite:///{tmp_path / 'jobs.db'}", {}
    else:
        url = request.getfixturevalue("redis_url")
        extra = {"prefix": f"t{uuid.uuid4().hex[:8]}:"}

    def factory(**kw):
        store = open_store(url, **extra, **kw)
        opened.append(store)
        return store

    factory.url, factory.extra = url, extra
    yield factory
    for store in opened:
        store.close()


def submit_n(store, n):
    return [store.submit("fal-ai/llava-next", "", {"prompt": f"p{i}", "image_url": "x"}).id
            for i in range(n)]


def test_submit_get_roundtrip_and_durable_reopen(make):
    store = make()
    job = store.submit("fal-ai/llava-next", "sub/path", {"prompt": "hi", "image_url": "u"},
                       webhook_url="http://hook/x")
    assert store.get("no-such-id") is None
    got = make().get(job.id)    # another connection / process view
    assert (got.id, got.endpoint, got.path, got.input, got.status, got.webhook_url) == (
        job.id, "fal-ai/llava-next", "sub/path", {"prompt": "hi", "image_url": "u"}, IN_QUEUE,
        "http://hook/x"), got
    assert abs(got.created_at - time.time()) < 60, got.created_at
    assert (got.attempts, got.cancel_requested, got.logs, got.result, got.error) == (
        0, False, [], None, None), got
    assert store.counts() == {IN_QUEUE: 1, IN_PROGRESS: 0}


def test_get_without_input_skips_only_the_input(make):
    store = make()
    job = store.submit("fal-ai/llava-next", "", {"prompt": "p", "image_url": "data:" + "A" * 10**5})
    store.append_log(job.id, "hello")
    claimed = store.claim("w1", timeout_s=0)
    store.complete(job.id, result={"output": "x", "partial": False})
    full, light = store.get(job.id), store.get(job.id, with_input=False)
    assert full.input["prompt"] == "p" and light.input == {}
    assert dataclasses.replace(full, input={}) == light, (full, light)
    assert claimed.input == full.input
    assert store.get("no-such-id", with_input=False) is None


def test_fifo_claim_and_queue_position(make):
    store = make()
    ids = submit_n(store, 4)
    assert [store.queue_position(i) for i in ids] == [0, 1, 2, 3]
    job = store.claim("w1", timeout_s=0)
    assert job.id == ids[0], (job.id, ids)
    assert (job.status, job.attempts) == (IN_PROGRESS, 1) and job.started_at is not None, job
    assert [store.queue_position(i) for i in ids] == [None, 0, 1, 2]
    assert store.queue_position("no-such-id") is None
    assert store.counts() == {IN_QUEUE: 3, IN_PROGRESS: 1}
    assert [store.claim("w1", 0).id for _ in range(3)] == ids[1:]
    assert store.claim("w1", timeout_s=0) is None


def test_claim_waits_for_a_submit_without_spinning(make):
    store, other = make(), make()
    t0 = time.monotonic()
    assert store.claim("w", timeout_s=0.3) is None
    assert 0.25 <= time.monotonic() - t0 < 2.0, time.monotonic() - t0
    threading.Timer(0.2, lambda: submit_n(other, 1)).start()   # another store: polled, not signalled
    cpu0, t0 = time.process_time(), time.monotonic()
    job = store.claim("w", timeout_s=5)
    waited = time.monotonic() - t0
    assert job is not None and 0.15 < waited < 1.5, (job, waited)
    assert time.process_time() - cpu0 < 0.5 * waited + 0.05, "claim busy-spins while waiting"


def test_concurrent_claims_never_hand_out_a_job_twice(make):
    ids = submit_n(make(), 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n):
        store = make() if n % 2 else shared   # separate connections and a shared one
        while (job := store.claim(f"w{n}", timeout_s=0)) is not None:
            with lock:
                claimed.append(job.id)

    shared = make()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    dupes = sorted({i for i in claimed if claimed.count(i) > 1})
    assert not dupes and sorted(claimed) == sorted(ids), (len(claimed), dupes[:3])


_CLAIMER = """
import sys, time
from fastllava.server.stores import open_store
kw = {"prefix": sys.argv[3]} if sys.argv[3] else {}
store = open_store(sys.argv[1], **kw)
print("ready", flush=True)
if sys.argv[2] == "hold":          # claim one job and die without completing it
    job = store.claim("holder", timeout_s=10)
    print(job.id, flush=True)
    time.sleep(60)
while (job := store.claim(sys.argv[2], timeout_s=0.5)) is not None:
    time.sleep(0.02)
    store.complete(job.id, result={"output": sys.argv[2], "partial": False})
    print(job.id, flush=True)
"""


def _spawn(make, arg):
    return subprocess.Popen([sys.executable, "-c", _CLAIMER, make.url, arg,
                             make.extra.get("prefix", "")], stdout=subprocess.PIPE, text=True)


def test_cross_process_claims(make):
    procs = [_spawn(make, f"p{n}") for n in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    store = make()
    ids = submit_n(store, 30)
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    claimed = outs[0] + outs[1]
    assert sorted(claimed) == sorted(ids), (len(claimed), len(ids))
    assert all(outs), f"one process claimed nothing: {[len(o) for o in outs]}"
    for n, out in enumerate(outs):
        assert all(store.get(i).result == {"output": f"p{n}", "partial": False} for i in out)


def test_cancel_semantics(make):
    store = make()
    queued, running, done = submit_n(store, 3)
    assert store.claim("w", 0).id == queued
    store.release(queued, "w")                          # back in front; now claim in order
    assert store.claim("w", 0).id == queued and store.claim("w", 0).id == running
    store.complete(queued, result={"output": "x", "partial": False})
    assert store.request_cancel(done) == "CANCELLATION_REQUESTED"    # still queued
    job = store.get(done)
    assert job.status == COMPLETED and job.error["status_code"] == 499, job
    assert job.error["error_type"] == "client_cancelled" and job.result is None, job
    assert store.claim("w", 0) is None, "a cancelled queued job was handed out"
    assert store.cancel_requested(running) is False
    assert store.request_cancel(running) == "CANCELLATION_REQUESTED"
    job = store.get(running)
    assert (job.status, job.cancel_requested) == (IN_PROGRESS, True), job
    assert store.cancel_requested(running) is True
    assert store.cancel_requested(queued) is True       # completed: nothing left to run
    assert store.cancel_requested("no-such-id") is True
    assert store.request_cancel(queued) == "ALREADY_COMPLETED"
    assert store.request_cancel(done) == "ALREADY_COMPLETED"
    assert store.request_cancel("no-such-id") == "NOT_FOUND"


def test_complete_once_and_counts(make):
    store = make()
    a, b = submit_n(store, 2)
    store.claim("w", 0)
    assert store.complete(a, result={"output": "hi", "partial": False}) is True
    assert store.complete(a, error={"status_code": 500, "detail": "x", "error_type": "e"}) is False
    job = store.get(a)
    assert (job.status, job.result, job.error) == (COMPLETED, {"output": "hi", "partial": False},
                                                   None), job
    assert job.finished_at >= job.started_at >= job.created_at, job
    assert store.complete("no-such-id", result={}) is False
    assert store.counts() == {IN_QUEUE: 1, IN_PROGRESS: 0}


def test_complete_writes_its_final_log_only_when_it_finishes(make):
    store = make()
    (a,) = submit_n(store, 1)
    store.claim("w", 0)
    assert store.complete(a, result={"output": "", "partial": False}, log=("done", "INFO"))
    assert not store.complete(a, result={"output": "x", "partial": False}, log=("again", "INFO"))
    messages = [(x["message"], x["level"]) for x in store.get(a).logs]
    assert ("done", "INFO") in messages and not any(m == "again" for m, _ in messages), messages


def test_lease_expiry_heartbeat_and_recover(make):
    store = make(lease_s=0.4, max_attempts=2)
    first, second = submit_n(store, 2)
    assert store.claim("w", 0).id == first
    for _ in range(3):                     # heartbeats keep the lease alive past lease_s
        time.sleep(0.2)
        store.heartbeat("w")
        assert store.recover() == 0
    time.sleep(0.6)
    assert store.recover() == 1
    job = store.get(first)
    assert (job.status, store.queue_position(first), store.queue_position(second)) == (
        IN_QUEUE, 0, 1), job
    assert "re-queued" in job.logs[-1]["message"] and job.logs[-1]["level"] == "WARN", job.logs
    again = store.claim("w2", 0)
    assert (again.id, again.attempts) == (first, 2), again
    time.sleep(0.6)                         # second lost lease: max_attempts reached → failed
    assert store.recover() == 1
    job = store.get(first)
    assert job.status == COMPLETED and job.error["status_code"] == 500, job
    assert store.claim("w3", 0).id == second
    store.request_cancel(second)
    time.sleep(0.6)                         # a lost job already asked to cancel is cancelled
    assert store.recover() == 1
    assert store.get(second).error["error_type"] == "client_cancelled"


def test_recover_takes_back_a_dead_process_job_at_once(make):
    store = make(lease_s=60)                # the lease alone would keep it for a minute
    ids = submit_n(store, 2)
    proc = _spawn(make, "hold")
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == ids[0]
    assert store.recover() == 0, "a live worker's job was taken back"
    proc.kill()
    proc.wait()
    assert store.recover() == 1
    job = store.get(ids[0])
    assert (job.status, job.attempts, store.queue_position(ids[0])) == (IN_QUEUE, 1, 0), job


def test_release_requeues_without_counting(make):
    store = make()
    (a,) = submit_n(store, 1)
    store.claim("w", 0)
    assert store.release(a, "other") is False
    assert store.release(a, "w") is True
    job = store.get(a)
    assert (job.status, job.attempts, store.queue_position(a)) == (IN_QUEUE, 0, 0), job
    assert store.release(a, "w") is False


def test_purge_expired(make):
    store = make()
    a, b = submit_n(store, 2)
    store.claim("w", 0)
    store.complete(a, result={"output": "", "partial": False})
    assert store.purge_expired(3600) == 0
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 1
    assert store.get(a) is None and store.get(b).status == IN_QUEUE


def test_logs(make):
    store = make()
    (a,) = submit_n(store, 1)
    store.append_log(a, "starting")
    store.append_log(a, "quote \" and ünïcode ✓", level="WARN")
    store.append_log("no-such-id", "ignored")
    logs = make().get(a).logs
    assert [(x["message"], x["level"], x["source"]) for x in logs] == [
        ("starting", "INFO", "USER"), ("quote \" and ünïcode ✓", "WARN", "USER")], logs
    assert logs[0]["timestamp"].endswith("+00:00") and json.dumps(logs), logs
    with pytest.raises(ValueError, match="level"):
        store.append_log(a, "x", level="LOUD")


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_store("sqlite:///rel.db").close()
    assert (tmp_path / "rel.db").is_file()
    open_store(f"sqlite:///{tmp_path / 'abs.db'}").close()
    assert (tmp_path / "abs.db").is_file()
    for bad in ("", "http://x/y", "sqlite://host/x.db", "sqlite:///", "jobs.db", "postgres://x"):
        with pytest.raises(ValueError, match="queue URL"):
            open_store(bad)
    with pytest.raises(ValueError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")


def test_idempotency_key_gives_one_job_per_request(make):
    store, other = make(), make()
    body = {"prompt": "p", "image_url": "u", "max_tokens": 3}
    first = store.submit("o/a", "sub", body, "http://hook/1", idempotency_key="k1")
    again = other.submit("o/a", "sub", dict(reversed(body.items())), "http://hook/1",
                         idempotency_key="k1")             # same request, keys in another order
    assert again.id == first.id and store.counts()[IN_QUEUE] == 1, (first, again)
    for path, changed, hook, differs in (
            ("sub", {**body, "max_tokens": 4}, "http://hook/1", ["body"]),
            ("other", body, "http://hook/1", ["path"]),
            ("sub", body, "http://hook/2", ["fal_webhook"]),
            ("other", {}, None, ["path", "body", "fal_webhook"])):
        with pytest.raises(IdempotencyConflict) as info:
            other.submit("o/a", path, changed, hook, idempotency_key="k1")
        assert (info.value.job_id, info.value.differs) == (first.id, differs)
    assert store.submit("o/b", "sub", body, "http://hook/1", idempotency_key="k1").id != first.id
    assert store.submit("o/a", "sub", body, "http://hook/1").id != first.id   # no key: new job
    assert store.counts()[IN_QUEUE] == 3


def test_idempotency_key_is_free_again_once_its_job_is_purged(make):
    store = make()
    first = store.submit("o/a", "", {"prompt": "p"}, idempotency_key="k")
    store.claim("w", 0)
    store.complete(first.id, result={"output": "", "partial": False})
    assert store.submit("o/a", "", {"prompt": "p"}, idempotency_key="k").id == first.id
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 1
    fresh = store.submit("o/a", "", {"prompt": "other"}, idempotency_key="k")  # no conflict
    assert fresh.id != first.id and store.get(fresh.id).status == IN_QUEUE


def test_concurrent_submits_with_one_key_make_one_job(make):
    ids, lock = [], threading.Lock()

    def submit(store):
        for _ in range(5):
            job = store.submit("o/a", "", {"prompt": "p"}, idempotency_key="race")
            with lock:
                ids.append(job.id)

    threads = [threading.Thread(target=submit, args=(make(),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == 30 and len(set(ids)) == 1, set(ids)
    assert make().counts()[IN_QUEUE] == 1


def test_every_completion_of_a_webhook_job_queues_one_delivery(make):
    store = make(lease_s=0.2, max_attempts=1)
    done, cancelled, crashed, plain = (
        store.submit("o/a", "", {"n": i}, webhook_url=None if i == 3 else f"http://h/{i}").id
        for i in range(4))
    store.claim("w", 0)
    assert store.complete(done, result={"output": "x", "partial": False})
    assert not store.complete(done, result={"output": "y", "partial": False})   # not twice
    store.request_cancel(cancelled)                      # cancelled while queued
    store.claim("w", 0)                                  # lease runs out, attempts used up
    time.sleep(0.3)
    assert store.recover() == 1 and store.get(crashed).error["status_code"] == 500
    store.claim("w", 0)
    store.complete(plain, result={"output": "", "partial": False})
    assert store.webhooks_pending() == 3
    claims = make().claim_webhooks(10, lease_s=60)
    assert sorted(c.job.id for c in claims) == sorted([done, cancelled, crashed])
    assert all(c.attempt == 1 and c.job.status == COMPLETED and c.job.input == {}
               for c in claims), claims
    assert {c.job.id: c.job.webhook_url for c in claims}[cancelled] == "http://h/1"
    assert store.claim_webhooks(10, lease_s=60) == [], "a claimed delivery was handed out twice"


def test_webhook_claims_lease_retry_and_take_over(make):
    store = make()
    (job_id,) = [store.submit("o/a", "", {}, webhook_url="http://h/").id]
    store.claim("w", 0)
    store.complete(job_id, result={"output": "", "partial": False})
    (claim,) = store.claim_webhooks(5, lease_s=0.2)
    assert store.webhook_attempted(claim, time.time() + 0.2, ("webhook delivery failed", "WARN"))
    assert store.claim_webhooks(5, lease_s=0.2) == []            # backing off
    time.sleep(0.25)
    (second,) = store.claim_webhooks(5, lease_s=0.2)
    assert second.attempt == 2 and second.owner != claim.owner
    time.sleep(0.25)                                              # its sender hung: lease over
    (third,) = make().claim_webhooks(5, lease_s=60)
    assert third.attempt == 3
    assert not store.webhook_attempted(second, None, ("late", "INFO"))   # taken over: ignored
    assert store.webhooks_pending() == 1
    assert store.webhook_attempted(third, None, ("webhook delivered", "INFO"))
    assert store.webhooks_pending() == 0
    lines = [x["message"] for x in store.get(job_id).logs]
    assert lines[-2:] == ["webhook delivery failed", "webhook delivered"], lines


_HOOK_HOLDER = """
import sys, time
from fastllava.server.stores import open_store
store = open_store(sys.argv[1], **({"prefix": sys.argv[2]} if sys.argv[2] else {}))
(claim,) = store.claim_webhooks(1, lease_s=600)
print(claim.job.id, flush=True)
time.sleep(60)
"""


def test_recover_frees_the_webhook_claims_of_a_dead_process_at_once(make):
    store = make()
    job_id = store.submit("o/a", "", {}, webhook_url="http://h/").id
    store.claim("w", 0)
    store.complete(job_id, result={"output": "", "partial": False})
    proc = subprocess.Popen([sys.executable, "-c", _HOOK_HOLDER, make.url,
                             make.extra.get("prefix", "")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == job_id
    store.recover()
    assert store.claim_webhooks(5, lease_s=60) == [], "a live process's claim was freed"
    proc.kill()
    proc.wait()
    store.recover()
    (claim,) = store.claim_webhooks(5, lease_s=60)            # long before the 600 s lease
    assert (claim.job.id, claim.attempt) == (job_id, 2), claim


def test_purge_drops_the_pending_delivery_with_its_job(make):
    store = make()
    job_id = store.submit("o/a", "", {}, webhook_url="http://h/").id
    store.claim("w", 0)
    store.complete(job_id, result={"output": "", "partial": False})
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 1
    assert store.webhooks_pending() == 0 and store.claim_webhooks(5, 60) == []


@pytest.mark.parametrize("make_file, expect", [
    (lambda p: p.write_bytes(os.urandom(8192)), "not an SQLite database"),
    (lambda p: sqlite_file(p, pages_to_corrupt=[5]), "corrupt"),
    (lambda p: sqlite3.connect(p).execute("CREATE TABLE jobs (name TEXT)").connection.commit(),
     "not a fastllava job store"),
    (lambda p: p.mkdir(), "cannot be opened"),
])
def test_a_file_that_is_no_job_store_is_refused_at_open(tmp_path, make_file, expect):
    path = tmp_path / "jobs.db"
    make_file(path)
    with pytest.raises(StoreUnavailable, match=expect) as info:
        open_store(f"sqlite:///{path}")
    assert str(path) in str(info.value) and "\n" not in str(info.value), info.value


def test_an_unreachable_redis_is_refused_at_open():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"     # nothing listens there
    for bad in (url, "redis://127.0.0.1:notaport/0"):
        with pytest.raises(StoreUnavailable, match="redis job store") as info:
            open_store(bad)
        assert bad in str(info.value), info.value
