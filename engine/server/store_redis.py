"""`RedisJobStore`: the job store on a shared Redis, for several server processes (or GPUs)
serving one endpoint. Same contract and semantics as `SqliteJobStore` (see store_sqlite.py).

Keys (`p` = the prefix, default "fastllava:"; one Redis database, not Redis Cluster):

    p+"seq"              counter giving each job its FIFO rank
    p+"job:"+id          hash: the Job fields (input/result/error as JSON), worker_id, seq
    p+"logs:"+id         list of JSON log items
    p+"queue"            zset id -> seq: the IN_QUEUE jobs, oldest first
    p+"leases"           zset id -> lease expiry (unix s): the IN_PROGRESS jobs
    p+"done"             zset id -> finished_at: the COMPLETED jobs, for purge_expired
    p+"worker:"+wid      {"host", "proc"} of a live worker, expiring lease_s after its last
                         heartbeat (or claim)
    p+"idem:"+sha256     hash {job_id, fingerprint} of an Idempotency-Key (sha256 of endpoint and
                         key); set by the submit script itself, deleted when its job is purged
    p+"hooks"            zset id -> due time (unix s): pending webhook deliveries; a claimed one
                         is due again when its lease ends. Attempts: the job hash's hook_attempts
    p+"hook_owners"      hash id -> claim token of a delivery being attempted now
    p+"opened_at"        written by every open (a probe that the server accepts writes)

Every state change is one Lua script (redis_scripts.py), atomic against every other client:
claim pops the queue head, marks the job IN_PROGRESS and adds its lease in one step, so no job
is handed out twice and none is lost between the pop and the lease; finishing a job with a
webhook_url adds its delivery to p+"hooks" in the same script. recover() takes back IN_PROGRESS
jobs whose lease ran out or whose worker key expired, and (at once) those of workers registered
on this host by a process that no longer exists, and frees webhook claims of such processes.
Times are the clients' clocks (keep the hosts in sync).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import Any

import redis

from . import redis_scripts as lua
from .jobs import (IN_PROGRESS, IN_QUEUE, IdempotencyConflict, Job, StoreUnavailable,
                   WebhookClaim, cancelled_error, claim_is_orphaned, claim_owner,
                   fingerprint_differs, job_error, log_item, process_host, process_is_dead,
                   process_token, request_fingerprint)

# Job hash fields a status read needs (all but the input, which may be a multi-MB data URI).
_FIELDS_NO_INPUT = ("id", "endpoint", "path", "status", "created_at", "started_at", "finished_at",
                    "result", "error", "webhook_url", "attempts", "cancel_requested")


def _num(text: str | None) -> float | None:
    return float(text) if text else None


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


class RedisJobStore:
    """JobStore on Redis at `url` ("redis://host:port/db"); safe to share between processes."""

    def __init__(self, url: str, *, prefix: str = "fastllava:", lease_s: float = 10.0,
                 max_attempts: int = 3, poll_s: float = 0.1):
        if not lease_s > 0 or not poll_s > 0:
            raise ValueError(f"lease_s and poll_s must be positive, got {lease_s!r}, {poll_s!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        self.url, self.prefix = url, prefix
        self.lease_s, self.max_attempts, self.poll_s = lease_s, max_attempts, poll_s
        try:
            # The URL's own options win over these defaults (redis-py merges them on top).
            self._r = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
            # The probe has a read timeout too: something listening that never answers (not a
            # Redis) fails in seconds. A write: a read-only replica or a full Redis fails now.
            with redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5) as probe:
                probe.set(prefix + "opened_at", repr(time.time()))
        except (redis.RedisError, ValueError, OSError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise StoreUnavailable(f"redis job store {url!r} cannot be used: {reason}") from None
        self._me = json.dumps({"host": process_host(), "proc": process_token()})
        self._arrived = threading.Condition(threading.Lock())
        self._s = {name: self._r.register_script(src) for name, src in (
            ("submit", lua.SUBMIT), ("claim", lua.CLAIM), ("heartbeat", lua.HEARTBEAT),
            ("log", lua.APPEND_LOG), ("complete", lua.COMPLETE), ("cancel", lua.CANCEL),
            ("release", lua.RELEASE), ("recover", lua.RECOVER_ONE), ("purge", lua.PURGE),
            ("claim_hooks", lua.CLAIM_HOOKS), ("hook_done", lua.HOOK_DONE))}

    def _run(self, name: str, *args: Any) -> Any:
        return self._s[name](args=[self.prefix, *args])

    def _wake(self) -> None:
        with self._arrived:
            self._arrived.notify_all()

    # ---- JobStore --------------------------------------------------------------------------------
    def submit(self, endpoint: str, path: str, input: dict[str, Any],
               webhook_url: str | None = None, *, idempotency_key: str | None = None) -> Job:
        job = Job(id=str(uuid.uuid4()), endpoint=endpoint, path=path, input=dict(input),
                  created_at=time.time(), webhook_url=webhook_url)
        idem = fingerprint = ""
        if idempotency_key is not None:
            scope = json.dumps([endpoint, idempotency_key]).encode()
            idem = self.prefix + "idem:" + hashlib.sha256(scope).hexdigest()
            fingerprint = request_fingerprint(endpoint, path, job.input, webhook_url)
        out = self._run("submit", job.id, endpoint, path, json.dumps(job.input),
                        repr(job.created_at), webhook_url or "", idem, fingerprint)
        if out[0] == "conflict":
            raise IdempotencyConflict(out[1], fingerprint_differs(out[2], fingerprint))
        if out[0] == "same":
            known = self.get(out[1], with_input=False)
            if known is not None:
                return known
            return self.submit(endpoint, path, input, webhook_url,       # purged in between
                               idempotency_key=idempotency_key)
        self._wake()
        return job

    def get(self, job_id: str, *, with_input: bool = True) -> Job | None:
        key = self.prefix + "job:" + job_id
        pipe = self._r.pipeline(transaction=True)
        if with_input:
            pipe.hgetall(key)
        else:
            pipe.hmget(key, _FIELDS_NO_INPUT)
        pipe.lrange(self.prefix + "logs:" + job_id, 0, -1)
        h, logs = pipe.execute()
        if not with_input:
            h = {} if h[0] is None else {**dict(zip(_FIELDS_NO_INPUT, h)), "input": "{}"}
        if not h:
            return None
        return Job(id=h["id"], endpoint=h["endpoint"], path=h["path"], input=json.loads(h["input"]),
                   status=h["status"], created_at=float(h["created_at"]),
                   started_at=_num(h.get("started_at")), finished_at=_num(h.get("finished_at")),
                   result=_json(h.get("result")), error=_json(h.get("error")),
                   logs=[json.loads(item) for item in logs], webhook_url=h["webhook_url"] or None,
                   attempts=int(h["attempts"]), cancel_requested=h["cancel_requested"] == "1")

    def queue_position(self, job_id: str) -> int | None:
        return self._r.zrank(self.prefix + "queue", job_id)

    def claim(self, worker_id: str, timeout_s: float) -> Job | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            job_id = self._run("claim", worker_id, repr(time.time()), repr(self.lease_s), self._me)
            if job_id:
                job = self.get(job_id)
                if job is not None:
                    return job
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._arrived:
                self._arrived.wait(min(self.poll_s, left))

    def heartbeat(self, worker_id: str) -> None:
        self._run("heartbeat", worker_id, repr(time.time()), repr(self.lease_s), self._me)

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        self._run("log", job_id, json.dumps(log_item(message, level)))

    def complete(self, job_id: str, result: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None, log: tuple[str, str] | None = None) -> bool:
        return self._run("complete", job_id, "" if result is None else json.dumps(result),
                         "" if error is None else json.dumps(error), repr(time.time()),
                         "" if log is None else json.dumps(log_item(*log))) == 1

    def release(self, job_id: str, worker_id: str) -> bool:
        done = self._run("release", job_id, worker_id, repr(time.time()),
                         json.dumps(cancelled_error()), json.dumps(log_item(
                             "returned to the queue: the server is shutting down", "WARN"))) == 1
        self._wake()
        return done

    def cancel_requested(self, job_id: str) -> bool:
        cancel, status = self._r.hmget(self.prefix + "job:" + job_id, "cancel_requested", "status")
        return status is None or cancel == "1" or status == "COMPLETED"

    def request_cancel(self, job_id: str) -> str:
        return self._run("cancel", job_id, repr(time.time()), json.dumps(cancelled_error()),
                         json.dumps(log_item("cancelled while queued")),
                         json.dumps(log_item("cancellation requested")))

    def recover(self) -> int:
        self._free_orphaned_hooks()
        taken = 0
        for job_id in self._r.zrange(self.prefix + "leases", 0, -1):
            worker = self._r.hget(self.prefix + "job:" + job_id, "worker_id")
            if worker is None:
                continue
            info = _json(self._r.get(self.prefix + "worker:" + worker)) or {}
            dead = bool(info) and process_is_dead(info["host"], info["proc"])
            why = "its server process died" if dead else "its lease expired"
            attempts = self._r.hget(self.prefix + "job:" + job_id, "attempts")
            taken += self._run(
                "recover", job_id, worker, repr(time.time()), "1" if dead else "0",
                self.max_attempts, json.dumps(cancelled_error()),
                json.dumps(job_error(500, f"the request was attempted {attempts} times and its "
                                     "worker stopped each time", "internal_error")),
                json.dumps(log_item(f"worker {worker} stopped ({why}); re-queued", "WARN")),
                json.dumps(log_item(f"worker {worker} stopped ({why}); giving up after "
                                    f"{attempts} attempts", "ERROR")))
        if taken:
            self._wake()
        return taken

    def purge_expired(self, retention_s: float) -> int:
        cutoff, total = repr(time.time() - retention_s), 0
        while True:
            n = self._run("purge", cutoff)
            total += n
            if n < 500:
                return total

    def counts(self) -> dict[str, int]:
        pipe = self._r.pipeline(transaction=False)
        pipe.zcard(self.prefix + "queue")
        pipe.zcard(self.prefix + "leases")
        queued, running = pipe.execute()
        return {IN_QUEUE: queued, IN_PROGRESS: running}

    def claim_webhooks(self, limit: int, lease_s: float) -> list[WebhookClaim]:
        now = time.time()
        if limit < 1 or not self._r.zrangebyscore(self.prefix + "hooks", "-inf", now, 0, 1):
            return []
        owner = claim_owner()
        out = self._run("claim_hooks", repr(now), limit, repr(now + lease_s), owner)
        claims = []
        for job_id, attempt in zip(out[::2], out[1::2]):
            job = self.get(job_id, with_input=False)
            if job is not None:
                claims.append(WebhookClaim(job, int(attempt), owner))
        return claims

    def webhook_attempted(self, claim: WebhookClaim, retry_at: float | None,
                          log: tuple[str, str] | None) -> bool:
        return self._run("hook_done", claim.job.id, claim.owner,
                         "" if retry_at is None else repr(retry_at),
                         "" if log is None else json.dumps(log_item(*log))) == 1

    def webhooks_pending(self) -> int:
        return self._r.zcard(self.prefix + "hooks")

    def _free_orphaned_hooks(self) -> None:
        for job_id, owner in self._r.hgetall(self.prefix + "hook_owners").items():
            if claim_is_orphaned(owner):
                self._run("hook_done", job_id, owner, repr(time.time()), "")

    def close(self) -> None:
        self._r.close()
