"""The job record and the store contract shared by the HTTP layer, the worker and the backends.

A job is one fal queue request. Its life: IN_QUEUE → IN_PROGRESS → COMPLETED (fal's only three
status strings; a failed or cancelled job is COMPLETED with `error` set). Stores are durable:
`SqliteJobStore` (embedded, the default) and `RedisJobStore` (shared by several server processes).
Both implement `JobStore`; the HTTP layer and the worker only ever talk to this protocol.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import time
import uuid
from typing import Any, Protocol

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
LOG_LEVELS = ("STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG")


def log_item(message: str, level: str = "INFO", now: float | None = None) -> dict[str, Any]:
    """One fal log entry: {message, level, source: "USER", timestamp (ISO 8601, UTC)}."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    ts = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    return {"message": message, "level": level, "source": "USER", "timestamp": ts.isoformat()}


def job_error(status_code: int, detail: str | list, error_type: str) -> dict[str, Any]:
    """Job.error: the fal error body plus the HTTP status the result route answers with."""
    return {"status_code": status_code, "detail": detail, "error_type": error_type}


def cancelled_error() -> dict[str, Any]:
    return job_error(499, "the request was cancelled by the client", "client_cancelled")


@dataclasses.dataclass
class Job:
    id: str
    endpoint: str                       # "owner/alias" (the path part is kept in `path`)
    path: str                           # "" or the sub-path after owner/alias on submit
    input: dict[str, Any]               # the model input, as submitted (validated before submit)
    status: str = IN_QUEUE
    created_at: float = 0.0             # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None   # the model output {"output", "partial": False}
    # Failure: {"status_code": int, "detail": str | list, "error_type": str} (fal's error body +
    # code), see job_error(); a cancelled job has status 499 / "client_cancelled".
    error: dict[str, Any] | None = None
    logs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    webhook_url: str | None = None
    attempts: int = 0                   # times a worker has claimed it (re-runs after a crash)
    cancel_requested: bool = False


class StoreUnavailable(ValueError):
    """The job store cannot be opened or used as one: a bad URL, an unreachable server, a corrupt,
    foreign, read-only or full database. The message is one line naming the store."""


class IdempotencyConflict(Exception):
    """submit() got an idempotency key that an earlier, different request already used.
    `differs`: what is different ("path", "body", "fal_webhook"), see fingerprint_differs."""

    def __init__(self, job_id: str, differs: list[str]):
        super().__init__(f"the idempotency key was used for job {job_id} with another "
                         f"{', '.join(differs)}")
        self.job_id, self.differs = job_id, differs


# The parts of a submit an idempotency key is bound to (the endpoint scopes the key itself).
_FINGERPRINT_PARTS = ("path", "body", "fal_webhook")


def request_fingerprint(endpoint: str, path: str, input: dict[str, Any],
                        webhook_url: str | None) -> str:
    """What makes two submits to one endpoint the same request: a sha256 per part (path, body,
    webhook), so a conflict can say which differs. The body is hashed as canonical JSON: key
    order and whitespace do not matter."""
    parts = (f"{endpoint}\n{path}", input, webhook_url)
    return ",".join(hashlib.sha256(json.dumps(part, sort_keys=True, separators=(",", ":"))
                                   .encode()).hexdigest() for part in parts)


def fingerprint_differs(stored: str, new: str) -> list[str]:
    """The parts (of _FINGERPRINT_PARTS) in which two request_fingerprints differ."""
    a, b = stored.split(","), new.split(",")
    if len(a) != len(_FINGERPRINT_PARTS) or len(b) != len(_FINGERPRINT_PARTS):
        return ["request"]
    return [name for name, x, y in zip(_FINGERPRINT_PARTS, a, b) if x != y] or ["request"]


@dataclasses.dataclass(frozen=True)
class WebhookClaim:
    """One webhook attempt handed to a sender by JobStore.claim_webhooks."""
    job: Job            # the COMPLETED job (input left out)
    attempt: int        # 1-based, counted across processes and restarts
    owner: str          # this claim's token (see claim_owner); webhook_attempted checks it


class JobStore(Protocol):
    def submit(self, endpoint: str, path: str, input: dict[str, Any],
               webhook_url: str | None = None, *, idempotency_key: str | None = None) -> Job:
        """Queue a new job. With idempotency_key: while the job an earlier submit with the same
        (endpoint, key) created is stored, return that job instead if the request_fingerprint
        matches, else raise IdempotencyConflict. Insert-or-get is one atomic step, across
        processes sharing the store."""
    def get(self, job_id: str, *, with_input: bool = True) -> Job | None:
        """The job, or None. with_input=False leaves Job.input empty ({}) without reading it: status
        polls and status streams never need a data-URI input that may be megabytes."""
    def queue_position(self, job_id: str) -> int | None:
        """0-based position among IN_QUEUE jobs (oldest first); None if not queued."""
    def claim(self, worker_id: str, timeout_s: float) -> Job | None:
        """Atomically move the oldest IN_QUEUE job to IN_PROGRESS (attempts += 1) and return it;
        wait up to timeout_s for one to arrive. A claimed job is leased to worker_id."""
    def heartbeat(self, worker_id: str) -> None:
        """Keep this worker's leases alive (jobs of workers that stop heartbeating are re-queued)."""
    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None: ...
    def complete(self, job_id: str, result: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None, log: tuple[str, str] | None = None) -> bool:
        """Finish a job (COMPLETED, finished_at set, lease dropped). True if this call finished
        it; False if it was already COMPLETED or is unknown (the first completion wins, so a job
        re-run after a lost lease never gets two results or two webhooks). `log` (message,
        level) is appended in the same transaction, only when this call finishes the job: a
        crash can never leave a "done" line on a job that is then run again. Every way a job
        with a webhook_url completes (here, cancel, recover giving up) queues its webhook
        delivery in that same transaction, due at once."""
    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a job this worker holds back to the queue, unfinished (graceful shutdown): it is
        IN_QUEUE again at its original place, and the interrupted attempt is not counted."""
    def request_cancel(self, job_id: str) -> str:
        """fal cancel semantics: a queued job becomes COMPLETED with a client_cancelled error
        → "CANCELLATION_REQUESTED"; a running one gets cancel_requested → "CANCELLATION_REQUESTED";
        "ALREADY_COMPLETED"; "NOT_FOUND"."""
    def cancel_requested(self, job_id: str) -> bool:
        """Cheap check for the worker: True if the job was asked to cancel, or is COMPLETED or
        gone (a running job's input, which may be a large data URI, is not read)."""
    def recover(self) -> int:
        """Take back IN_PROGRESS jobs of dead workers (lease expired, or the worker's process on
        this host is gone, see process_is_dead) and re-queue them at their original place; one
        already asked to cancel completes as cancelled (499), one claimed max_attempts times
        completes with a 500. Returns how many jobs were taken back."""
    def purge_expired(self, retention_s: float) -> int:
        """Delete COMPLETED jobs finished more than retention_s ago; returns how many."""
    def counts(self) -> dict[str, int]:
        """{"IN_QUEUE": n, "IN_PROGRESS": m}."""
    def claim_webhooks(self, limit: int, lease_s: float) -> list[WebhookClaim]:
        """Take up to `limit` due webhook deliveries (attempts += 1) for this process. A claim is
        due again after lease_s (its sender hung or died) or, once recover() sees this process
        is gone, at once. Deliveries of purged jobs are dropped."""
    def webhook_attempted(self, claim: WebhookClaim, retry_at: float | None,
                          log: tuple[str, str] | None) -> bool:
        """Record an attempt's outcome: retry_at None → the delivery is done (delivered or given
        up), else due again at retry_at (unix s). `log` (message, level) goes on the job in the
        same transaction. False (and nothing written) when the claim was taken over meanwhile."""
    def webhooks_pending(self) -> int:
        """Webhook deliveries not finished yet (due, in backoff or being attempted)."""
    def close(self) -> None: ...


# ---- worker liveness ----------------------------------------------------------------------------
# A worker id is registered with the identity of the process that runs it: `process_host()` (the
# hostname, the kernel boot id and the pid namespace, so two containers that happen to share a
# hostname are told apart) and `process_token()` ("pid:start_time", so a recycled pid is not taken
# for the old process). recover() can then tell, without waiting for a lease to run out, that a
# worker registered on *this* host belongs to a process that no longer exists (SIGKILL, OOM), and
# re-queue its jobs at once. Workers on other hosts are judged by their lease only.

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (field 22 of /proc/<pid>/stat), "" when
    /proc is unavailable (not Linux), None when the process is gone or a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return "" if not _read("/proc/self/stat") else None
    fields = stat[stat.rfind(")") + 2:].split()   # after "pid (comm) "; comm may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def process_host() -> str:
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{pidns}"


def process_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or ''}"


def claim_owner() -> str:
    """A fresh claim token that also names this process (for claim_is_orphaned)."""
    return json.dumps([uuid.uuid4().hex, process_host(), process_token()])


def claim_is_orphaned(owner: str) -> bool:
    """True when the process that made this claim_owner() token is certainly gone."""
    try:
        _, host, token = json.loads(owner)
    except (ValueError, TypeError):
        return False
    return process_is_dead(host, token)


def process_is_dead(host: str, token: str) -> bool:
    """True only when the process is certainly gone: registered on this host, and its pid is free,
    a zombie, or now belongs to a process started at another time."""
    if host != process_host():
        return False
    pid_text, _, started = token.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now_started = _start_time(pid)
    if now_started is None:
        return True
    if started and now_started and started != now_started:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
