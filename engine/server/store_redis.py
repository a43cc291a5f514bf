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

Every state change is one Lua script, so it is atomic against every other client: claim pops the
queue head, marks the job IN_PROGRESS and adds its lease in one step, so no job is handed out
twice and none is lost between the pop and the lease; finishing a job with a webhook_url adds
its delivery to p+"hooks" in the same script. recover() takes back IN_PROGRESS jobs whose lease
ran out or whose worker key expired, and (at once) those of workers registered on this host by a
process that no longer exists, and frees webhook claims of such processes. Times are the
clients' clocks (keep the hosts in sync).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import Any

import redis

from .jobs import (IN_PROGRESS, IN_QUEUE, IdempotencyConflict, Job, StoreUnavailable,
                   WebhookClaim, cancelled_error, claim_is_orphaned, claim_owner, job_error,
                   log_item, process_host, process_is_dead, process_token, request_fingerprint)

# finish(p, id, result_json, error_json, now) -> 1 if this call completed the job.
_FINISH = """
local function finish(p, id, result, err, now)
  local key = p .. 'job:' .. id
  local st = redis.call('HGET', key, 'status')
  if (not st) or st == 'COMPLETED' then return 0 end
  redis.call('HSET', key, 'status', 'COMPLETED', 'finished_at', now, 'result', result,
             'error', err)
  redis.call('ZREM', p .. 'leases', id)
  redis.call('ZREM', p .. 'queue', id)
  redis.call('ZADD', p .. 'done', now, id)
  local hook = redis.call('HGET', key, 'webhook_url')
  if hook and hook ~= '' then
    redis.call('HSET', key, 'hook_attempts', 0)
    redis.call('ZADD', p .. 'hooks', now, id)
  end
  return 1
end
"""
# Job hash fields a status read needs (all but the input, which may be a multi-MB data URI).
_FIELDS_NO_INPUT = ("id", "endpoint", "path", "status", "created_at", "started_at", "finished_at",
                    "result", "error", "webhook_url", "attempts", "cancel_requested")
# ARGV: p, id, endpoint, path, input, created_at, webhook_url, idem key ('' for none),
# fingerprint -> {seq} for a new job, {'same', id} / {'conflict', id} for a known key.
_SUBMIT = """
local p, id = ARGV[1], ARGV[2]
if ARGV[8] ~= '' then
  local known = redis.call('HMGET', ARGV[8], 'job_id', 'fingerprint')
  if known[1] and redis.call('EXISTS', p .. 'job:' .. known[1]) == 1 then
    if known[2] == ARGV[9] then return {'same', known[1]} end
    return {'conflict', known[1]}
  end
  redis.call('HSET', ARGV[8], 'job_id', id, 'fingerprint', ARGV[9])
end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'job:' .. id, 'id', id, 'endpoint', ARGV[3], 'path', ARGV[4],
           'input', ARGV[5], 'status', 'IN_QUEUE', 'created_at', ARGV[6], 'webhook_url', ARGV[7],
           'attempts', 0, 'cancel_requested', 0, 'seq', seq, 'result', '', 'error', '',
           'idem', ARGV[8])
redis.call('ZADD', p .. 'queue', seq, id)
return {seq}
"""
# ARGV: p, worker_id, now, lease_s, worker info JSON
_CLAIM = """
local p = ARGV[1]
local popped = redis.call('ZPOPMIN', p .. 'queue')
if #popped == 0 then return false end
local id = popped[1]
local key = p .. 'job:' .. id
redis.call('HSET', key, 'status', 'IN_PROGRESS', 'worker_id', ARGV[2], 'started_at', ARGV[3])
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('ZADD', p .. 'leases', tonumber(ARGV[3]) + tonumber(ARGV[4]), id)
redis.call('SET', p .. 'worker:' .. ARGV[2], ARGV[5], 'PX', math.ceil(tonumber(ARGV[4]) * 1000))
return id
"""
_HEARTBEAT = """
local p, wid = ARGV[1], ARGV[2]
redis.call('SET', p .. 'worker:' .. wid, ARGV[5], 'PX', math.ceil(tonumber(ARGV[4]) * 1000))
local until_ = tonumber(ARGV[3]) + tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGE', p .. 'leases', 0, -1)) do
  if redis.call('HGET', p .. 'job:' .. id, 'worker_id') == wid then
    redis.call('ZADD', p .. 'leases', 'XX', until_, id)
  end
end
return 0
"""
_APPEND_LOG = """
if redis.call('EXISTS', ARGV[1] .. 'job:' .. ARGV[2]) == 0 then return 0 end
return redis.call('RPUSH', ARGV[1] .. 'logs:' .. ARGV[2], ARGV[3])
"""
# ARGV: p, id, result, error, now, final log item ('' for none), written only if this call finishes
_COMPLETE = _FINISH + """
local done = finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if done == 1 and ARGV[6] ~= '' then redis.call('RPUSH', ARGV[1] .. 'logs:' .. ARGV[2], ARGV[6]) end
return done
"""
# ARGV: p, id, now, cancelled error JSON, log (queued), log (running)
_CANCEL = _FINISH + """
local p, id = ARGV[1], ARGV[2]
local st = redis.call('HGET', p .. 'job:' .. id, 'status')
if not st then return 'NOT_FOUND' end
if st == 'COMPLETED' then return 'ALREADY_COMPLETED' end
if st == 'IN_QUEUE' then
  finish(p, id, '', ARGV[4], ARGV[3])
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[5])
else
  redis.call('HSET', p .. 'job:' .. id, 'cancel_requested', 1)
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[6])
end
return 'CANCELLATION_REQUESTED'
"""
# requeue(p, id, log): back to the queue at the job's original rank.
_REQUEUE = """
local function requeue(p, id, log, uncount)
  local key = p .. 'job:' .. id
  redis.call('HSET', key, 'status', 'IN_QUEUE')
  redis.call('HDEL', key, 'worker_id', 'started_at')
  if uncount and tonumber(redis.call('HGET', key, 'attempts')) > 0 then
    redis.call('HINCRBY', key, 'attempts', -1)
  end
  redis.call('ZREM', p .. 'leases', id)
  redis.call('ZADD', p .. 'queue', tonumber(redis.call('HGET', key, 'seq')), id)
  redis.call('RPUSH', p .. 'logs:' .. id, log)
end
"""
# ARGV: p, id, worker_id, now, cancelled error JSON, log
_RELEASE = _FINISH + _REQUEUE + """
local p, id = ARGV[1], ARGV[2]
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', key, 'worker_id') ~= ARGV[3] then return 0 end
if redis.call('HGET', key, 'cancel_requested') == '1' then
  return finish(p, id, '', ARGV[5], ARGV[4])
end
requeue(p, id, ARGV[6], true)
return 1
"""
# ARGV: p, id, expected worker_id, now, process_dead ("1"/"0"), max_attempts,
#       cancelled error JSON, give-up error JSON, re-queue log, give-up log
_RECOVER_ONE = _FINISH + _REQUEUE + """
local p, id, wid, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', key, 'worker_id') ~= wid then return 0 end
local lease = redis.call('ZSCORE', p .. 'leases', id)
local alive = redis.call('EXISTS', p .. 'worker:' .. wid) == 1
if ARGV[5] ~= '1' and alive and lease and tonumber(lease) >= now then return 0 end
if redis.call('HGET', key, 'cancel_requested') == '1' then
  finish(p, id, '', ARGV[7], ARGV[4])
elseif tonumber(redis.call('HGET', key, 'attempts')) >= tonumber(ARGV[6]) then
  finish(p, id, '', ARGV[8], ARGV[4])
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[10])
else
  requeue(p, id, ARGV[9], false)
end
return 1
"""
_PURGE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'done', '-inf', '(' .. ARGV[2], 'LIMIT', 0, 500)
for _, id in ipairs(ids) do
  local idem = redis.call('HGET', p .. 'job:' .. id, 'idem')
  if idem and idem ~= '' and redis.call('HGET', idem, 'job_id') == id then
    redis.call('DEL', idem)
  end
  redis.call('DEL', p .. 'job:' .. id, p .. 'logs:' .. id)
  redis.call('ZREM', p .. 'done', id)
  redis.call('ZREM', p .. 'hooks', id)
  redis.call('HDEL', p .. 'hook_owners', id)
end
return #ids
"""
# ARGV: p, now, limit, lease end, owner -> {id, attempt, id, attempt, ...}
_CLAIM_HOOKS = """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'hooks', '-inf', ARGV[2], 'LIMIT', 0,
                               tonumber(ARGV[3]))) do
  local key = p .. 'job:' .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', p .. 'hooks', id)
    redis.call('HDEL', p .. 'hook_owners', id)
  else
    table.insert(out, id)
    table.insert(out, redis.call('HINCRBY', key, 'hook_attempts', 1))
    redis.call('ZADD', p .. 'hooks', ARGV[4], id)
    redis.call('HSET', p .. 'hook_owners', id, ARGV[5])
  end
end
return out
"""
# ARGV: p, id, owner, retry_at ('' = done), log item ('' = none) -> 1 if the claim was still ours.
# With retry_at = now and no log it frees an orphaned claim (recover).
_HOOK_DONE = """
local p, id = ARGV[1], ARGV[2]
if redis.call('HGET', p .. 'hook_owners', id) ~= ARGV[3] then return 0 end
redis.call('HDEL', p .. 'hook_owners', id)
if ARGV[4] == '' then
  redis.call('ZREM', p .. 'hooks', id)
else
  redis.call('ZADD', p .. 'hooks', ARGV[4], id)
end
if ARGV[5] ~= '' and redis.call('EXISTS', p .. 'job:' .. id) == 1 then
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[5])
end
return 1
"""


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
            self._r.ping()
            # A write: a read-only replica or a Redis out of memory fails here, at startup.
            self._r.set(prefix + "opened_at", repr(time.time()))
        except (redis.RedisError, ValueError, OSError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise StoreUnavailable(f"redis job store {url!r} cannot be used: {reason}") from None
        self._me = json.dumps({"host": process_host(), "proc": process_token()})
        self._arrived = threading.Condition(threading.Lock())
        self._s = {name: self._r.register_script(src) for name, src in (
            ("submit", _SUBMIT), ("claim", _CLAIM), ("heartbeat", _HEARTBEAT),
            ("log", _APPEND_LOG), ("complete", _COMPLETE), ("cancel", _CANCEL),
            ("release", _RELEASE), ("recover", _RECOVER_ONE), ("purge", _PURGE),
            ("claim_hooks", _CLAIM_HOOKS), ("hook_done", _HOOK_DONE))}

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
            raise IdempotencyConflict(out[1])
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
