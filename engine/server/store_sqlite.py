"""`SqliteJobStore`: the embedded, durable job store (one SQLite file, the default backend).

Durability. WAL journal with synchronous=FULL: once submit() returns, the job survives a process
crash and a power loss. Several processes may share the file (each opens its own connection;
writes take SQLite's write lock with `BEGIN IMMEDIATE`, waiting up to `busy_timeout_s`).

Leases. claim() moves the oldest IN_QUEUE job (FIFO by an autoincrement `seq`) to IN_PROGRESS in
one write transaction, records the worker id and `lease_expires_at = now + lease_s`, and registers
the worker (host, process token, last_seen) in the `workers` table. heartbeat(worker_id) pushes
the lease of every job of that worker forward. recover() takes back IN_PROGRESS jobs whose lease
ran out, or whose worker was registered on this host by a process that no longer exists (see
jobs.process_is_dead: this is what makes a job that was running when the server was SIGKILLed
run again right after the restart, without waiting lease_s). A recovered job goes back to its
original place at the head of the queue; one already asked to cancel is completed as cancelled
(499), and one that has been claimed `max_attempts` times (a request that kills its server) is
completed with a 500 instead of being tried forever.

Idempotency keys live in `idempotency` (primary key endpoint + key, with the request fingerprint
and the job id), inserted in the submit's own write transaction, so the same key sent twice, to
two processes, or after a restart gives one job; they go when their job is purged.

Webhooks. Finishing a job that has a webhook_url inserts its delivery into `webhooks` in the same
transaction (a crash cannot lose it). claim_webhooks() hands due deliveries out with
`owner` = a claim token naming the process and `due_at` = the lease end; webhook_attempted()
deletes the row or sets the next due time. recover() frees at once the claims of a process that
is gone.

Opening (sqlite_file.open_checked) creates the tables and checks the file before anything else
uses it: a corrupt, foreign, read-only or full one is a one-line StoreUnavailable.

Thread safety: one connection per store, used under a lock (SQLite serialises writers anyway).
claim(timeout_s) waits on a condition that in-process submits signal and re-reads the table every
`poll_s` for jobs submitted by other processes; it never spins.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .jobs import (COMPLETED, IN_PROGRESS, IN_QUEUE, IdempotencyConflict, Job, WebhookClaim,
                   cancelled_error, claim_is_orphaned, claim_owner, fingerprint_differs,
                   job_error, log_item, process_host, process_is_dead, process_token,
                   request_fingerprint)
from .sqlite_file import open_checked

_COLUMNS = ("id, endpoint, path, input, status, created_at, started_at, finished_at, result, "
            "error, logs, webhook_url, attempts, cancel_requested")
_COLUMNS_NO_INPUT = _COLUMNS.replace(" input,", " '{}',")
# Workers unseen this long are forgotten (their jobs were recovered long before, by lease).
_WORKER_FORGET_S = 24 * 3600.0


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _row_to_job(row: tuple) -> Job:
    (id_, endpoint, path, input_, status, created, started, finished, result, error, logs,
     webhook, attempts, cancel) = row
    return Job(id=id_, endpoint=endpoint, path=path, input=json.loads(input_), status=status,
               created_at=created, started_at=started, finished_at=finished,
               result=_loads(result), error=_loads(error), logs=json.loads(logs),
               webhook_url=webhook, attempts=attempts, cancel_requested=bool(cancel))


class SqliteJobStore:
    """JobStore on one SQLite file (`path`; ":memory:" gives a private, non-durable store)."""

    def __init__(self, path: str | Path, *, lease_s: float = 10.0, max_attempts: int = 3,
                 busy_timeout_s: float = 10.0, poll_s: float = 0.1):
        if not lease_s > 0 or not poll_s > 0 or not busy_timeout_s > 0:
            raise ValueError(f"lease_s, poll_s and busy_timeout_s must be positive, got "
                             f"{lease_s!r}, {poll_s!r}, {busy_timeout_s!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        self.path = str(path)
        self.lease_s, self.max_attempts, self.poll_s = lease_s, max_attempts, poll_s
        self._lock = threading.RLock()
        self._arrived = threading.Condition(threading.Lock())
        self._host, self._proc = process_host(), process_token()
        self._db: sqlite3.Connection | None = open_checked(self.path, busy_timeout_s)

    # ---- plumbing --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"sqlite job store {self.path!r} is closed")
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the file's write lock up front, so a
        read-then-update inside it is atomic across threads and processes."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    def _register(self, db: sqlite3.Connection, worker_id: str, now: float) -> None:
        db.execute("INSERT INTO workers (worker_id, host, proc, last_seen) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (worker_id) DO UPDATE SET host=excluded.host, "
                   "proc=excluded.proc, last_seen=excluded.last_seen",
                   (worker_id, self._host, self._proc, now))

    @staticmethod
    def _log(db: sqlite3.Connection, job_id: str, message: str, level: str = "INFO") -> None:
        db.execute("UPDATE jobs SET logs = json_insert(logs, '$[#]', json(?)) WHERE id = ?",
                   (json.dumps(log_item(message, level)), job_id))

    @staticmethod
    def _finish(db: sqlite3.Connection, job_id: str, result: Any, error: Any, now: float) -> bool:
        cur = db.execute(
            "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, "
            "lease_expires_at = NULL WHERE id = ? AND status != ?",
            (COMPLETED, None if result is None else json.dumps(result),
             None if error is None else json.dumps(error), now, job_id, COMPLETED))
        if cur.rowcount != 1:
            return False
        db.execute("INSERT OR REPLACE INTO webhooks (job_id, due_at) SELECT id, ? FROM jobs "
                   "WHERE id = ? AND webhook_url IS NOT NULL", (now, job_id))
        return True

    # ---- JobStore --------------------------------------------------------------------------------
    def submit(self, endpoint: str, path: str, input: dict[str, Any],
               webhook_url: str | None = None, *, idempotency_key: str | None = None) -> Job:
        job = Job(id=str(uuid.uuid4()), endpoint=endpoint, path=path, input=dict(input),
                  created_at=time.time(), webhook_url=webhook_url)
        with self._write() as db:
            if idempotency_key is not None:
                fingerprint = request_fingerprint(endpoint, path, job.input, webhook_url)
                row = db.execute("SELECT k.fingerprint, k.job_id FROM idempotency k JOIN jobs j "
                                 "ON j.id = k.job_id WHERE k.endpoint = ? AND k.key = ?",
                                 (endpoint, idempotency_key)).fetchone()
                if row is not None and row[0] != fingerprint:
                    raise IdempotencyConflict(row[1], fingerprint_differs(row[0], fingerprint))
                if row is not None:
                    return _row_to_job(db.execute(f"SELECT {_COLUMNS_NO_INPUT} FROM jobs "
                                                  "WHERE id = ?", (row[1],)).fetchone())
                # A key whose job was purged is free again.
                db.execute("INSERT OR REPLACE INTO idempotency (endpoint, key, fingerprint, "
                           "job_id) VALUES (?, ?, ?, ?)",
                           (endpoint, idempotency_key, fingerprint, job.id))
            db.execute("INSERT INTO jobs (id, endpoint, path, input, status, created_at, "
                       "webhook_url) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job.id, endpoint, path, json.dumps(job.input), IN_QUEUE, job.created_at,
                        webhook_url))
        with self._arrived:
            self._arrived.notify()
        return job

    def get(self, job_id: str, *, with_input: bool = True) -> Job | None:
        columns = _COLUMNS if with_input else _COLUMNS_NO_INPUT
        rows = self._read(f"SELECT {columns} FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    def queue_position(self, job_id: str) -> int | None:
        rows = self._read("SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = ? AND q.seq < j.seq)"
                          " FROM jobs j WHERE j.id = ? AND j.status = ?",
                          (IN_QUEUE, job_id, IN_QUEUE))
        return rows[0][0] if rows else None

    def _try_claim(self, worker_id: str) -> Job | None:
        # A plain read first: idle polling never takes the write lock.
        if not self._read("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (IN_QUEUE,)):
            return None
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                             (IN_QUEUE,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, worker_id = ?, lease_expires_at = ?, "
                       "started_at = ?, attempts = attempts + 1 WHERE id = ?",
                       (IN_PROGRESS, worker_id, now + self.lease_s, now, row[0]))
            self._register(db, worker_id, now)
            job = _row_to_job(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                         row).fetchone())
        return job

    def claim(self, worker_id: str, timeout_s: float) -> Job | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            job = self._try_claim(worker_id)
            left = deadline - time.monotonic()
            if job is not None or left <= 0:
                return job
            with self._arrived:
                self._arrived.wait(min(self.poll_s, left))

    def heartbeat(self, worker_id: str) -> None:
        now = time.time()
        with self._write() as db:
            self._register(db, worker_id, now)
            db.execute("UPDATE jobs SET lease_expires_at = ? WHERE worker_id = ? AND status = ?",
                       (now + self.lease_s, worker_id, IN_PROGRESS))

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        log_item(message, level)  # validates the level before taking the write lock
        with self._write() as db:
            self._log(db, job_id, message, level)

    def complete(self, job_id: str, result: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None, log: tuple[str, str] | None = None) -> bool:
        with self._write() as db:
            done = self._finish(db, job_id, result, error, time.time())
            if done and log is not None:
                self._log(db, job_id, *log)
            return done

    def release(self, job_id: str, worker_id: str) -> bool:
        with self._write() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ? AND status = ? AND "
                             "worker_id = ?", (job_id, IN_PROGRESS, worker_id)).fetchone()
            if row is None:
                return False
            if row[0]:
                return self._finish(db, job_id, None, cancelled_error(), time.time())
            db.execute("UPDATE jobs SET status = ?, worker_id = NULL, lease_expires_at = NULL, "
                       "started_at = NULL, attempts = MAX(attempts - 1, 0) WHERE id = ?",
                       (IN_QUEUE, job_id))
            self._log(db, job_id, "returned to the queue: the server is shutting down", "WARN")
        with self._arrived:
            self._arrived.notify()
        return True

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._read("SELECT cancel_requested, status FROM jobs WHERE id = ?", (job_id,))
        return not rows or bool(rows[0][0]) or rows[0][1] == COMPLETED

    def request_cancel(self, job_id: str) -> str:
        with self._write() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return "NOT_FOUND"
            if row[0] == COMPLETED:
                return "ALREADY_COMPLETED"
            if row[0] == IN_QUEUE:
                self._finish(db, job_id, None, cancelled_error(), time.time())
                self._log(db, job_id, "cancelled while queued")
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._log(db, job_id, "cancellation requested")
            return "CANCELLATION_REQUESTED"

    def recover(self) -> int:
        # Decide from plain reads (this runs every heartbeat); write only when something is dead.
        now = time.time()
        rows = self._read("SELECT j.id, j.worker_id, j.lease_expires_at, w.host, w.proc FROM jobs "
                          "j LEFT JOIN workers w ON w.worker_id = j.worker_id WHERE j.status = ?",
                          (IN_PROGRESS,))
        lost = []
        for job_id, worker, lease, host, proc in rows:
            crashed = host is not None and process_is_dead(host, proc)
            if crashed or lease is None or lease < now:
                lost.append((job_id, worker, crashed))
        gone = [w for w, host, proc in self._read("SELECT worker_id, host, proc FROM workers")
                if process_is_dead(host, proc)]
        orphaned = [(job_id, owner) for job_id, owner in self._read(
            "SELECT job_id, owner FROM webhooks WHERE owner IS NOT NULL")
            if claim_is_orphaned(owner)]
        if not lost and not gone and not orphaned:
            return 0
        taken = 0
        with self._write() as db:
            for job_id, worker, crashed in lost:
                row = db.execute("SELECT attempts, cancel_requested, lease_expires_at FROM jobs "
                                 "WHERE id = ? AND status = ? AND worker_id IS ?",
                                 (job_id, IN_PROGRESS, worker)).fetchone()
                if row is None or not (crashed or row[2] is None or row[2] < now):
                    continue                    # finished or heartbeaten since the read
                attempts, cancel, _ = row
                taken += 1
                why = "its server process died" if crashed else "its lease expired"
                if cancel:
                    self._finish(db, job_id, None, cancelled_error(), now)
                elif attempts >= self.max_attempts:
                    self._finish(db, job_id, None, job_error(
                        500, f"the request was attempted {attempts} times and its worker stopped "
                        "each time", "internal_error"), now)
                    self._log(db, job_id, f"worker {worker} stopped ({why}); giving up after "
                              f"{attempts} attempts", "ERROR")
                else:
                    db.execute("UPDATE jobs SET status = ?, worker_id = NULL, "
                               "lease_expires_at = NULL, started_at = NULL WHERE id = ?",
                               (IN_QUEUE, job_id))
                    self._log(db, job_id, f"worker {worker} stopped ({why}); re-queued", "WARN")
            db.executemany("DELETE FROM workers WHERE worker_id = ?", [(w,) for w in gone])
            db.executemany("UPDATE webhooks SET owner = NULL, due_at = ? WHERE job_id = ? AND "
                           "owner = ?", [(now, job_id, owner) for job_id, owner in orphaned])
        if taken:
            with self._arrived:
                self._arrived.notify_all()
        return taken

    def purge_expired(self, retention_s: float) -> int:
        now = time.time()
        with self._write() as db:
            for table, column in (("idempotency", "job_id"), ("webhooks", "job_id")):
                db.execute(f"DELETE FROM {table} WHERE {column} IN (SELECT id FROM jobs WHERE "
                           "status = ? AND finished_at < ?)", (COMPLETED, now - retention_s))
            cur = db.execute("DELETE FROM jobs WHERE status = ? AND finished_at < ?",
                             (COMPLETED, now - retention_s))
            db.execute("DELETE FROM workers WHERE last_seen < ?", (now - _WORKER_FORGET_S,))
            return cur.rowcount

    def counts(self) -> dict[str, int]:
        found = dict(self._read("SELECT status, COUNT(*) FROM jobs WHERE status IN (?, ?) "
                                "GROUP BY status", (IN_QUEUE, IN_PROGRESS)))
        return {IN_QUEUE: found.get(IN_QUEUE, 0), IN_PROGRESS: found.get(IN_PROGRESS, 0)}

    def claim_webhooks(self, limit: int, lease_s: float) -> list[WebhookClaim]:
        now = time.time()
        # A plain read first: idle polling never takes the write lock.
        if limit < 1 or not self._read("SELECT 1 FROM webhooks WHERE due_at <= ? LIMIT 1", (now,)):
            return []
        owner, claims = claim_owner(), []
        with self._write() as db:
            rows = db.execute("SELECT w.job_id, w.attempts, j.id FROM webhooks w LEFT JOIN jobs j "
                              "ON j.id = w.job_id WHERE w.due_at <= ? ORDER BY w.due_at LIMIT ?",
                              (now, limit)).fetchall()
            for job_id, attempts, exists in rows:
                if exists is None:                    # its job was purged: nothing to send
                    db.execute("DELETE FROM webhooks WHERE job_id = ?", (job_id,))
                    continue
                db.execute("UPDATE webhooks SET attempts = ?, owner = ?, due_at = ? WHERE "
                           "job_id = ?", (attempts + 1, owner, now + lease_s, job_id))
                job = _row_to_job(db.execute(f"SELECT {_COLUMNS_NO_INPUT} FROM jobs WHERE id = ?",
                                             (job_id,)).fetchone())
                claims.append(WebhookClaim(job, attempts + 1, owner))
        return claims

    def webhook_attempted(self, claim: WebhookClaim, retry_at: float | None,
                          log: tuple[str, str] | None) -> bool:
        with self._write() as db:
            if retry_at is None:
                cur = db.execute("DELETE FROM webhooks WHERE job_id = ? AND owner = ?",
                                 (claim.job.id, claim.owner))
            else:
                cur = db.execute("UPDATE webhooks SET owner = NULL, due_at = ? WHERE job_id = ? "
                                 "AND owner = ?", (retry_at, claim.job.id, claim.owner))
            if cur.rowcount == 1 and log is not None:
                self._log(db, claim.job.id, *log)
            return cur.rowcount == 1

    def webhooks_pending(self) -> int:
        return self._read("SELECT COUNT(*) FROM webhooks")[0][0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
