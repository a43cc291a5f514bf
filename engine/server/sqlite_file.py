"""Opening an SQLite job-store file: the tables, the pragmas, and the checks that make a bad file
fail when the server starts, in one line (StoreUnavailable), instead of at the first request or
after the model has loaded: not an SQLite file, corrupt (PRAGMA quick_check), another program's
tables under the same names, a read-only file or folder, a full disk (a probe write).

Durability: WAL journal with synchronous=FULL (a committed write survives a crash and a power
loss); autocommit mode, the store opens its own transactions (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from .jobs import StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    path TEXT NOT NULL,
    input TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    error TEXT,
    logs TEXT NOT NULL DEFAULT '[]',
    webhook_url TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_status_finished ON jobs (status, finished_at);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    proc TEXT NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    endpoint TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (endpoint, key)
);
CREATE INDEX IF NOT EXISTS idempotency_job ON idempotency (job_id);
CREATE TABLE IF NOT EXISTS webhooks (
    job_id TEXT PRIMARY KEY,
    due_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (due_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)
"""
# Every column the store reads, compiled once at open: a file holding another program's tables of
# the same names fails there, not at the first request.
SHAPE = ("SELECT seq, id, endpoint, path, input, status, created_at, started_at, finished_at, "
          "result, error, logs, webhook_url, attempts, cancel_requested, worker_id, "
          "lease_expires_at FROM jobs LIMIT 0",
          "SELECT worker_id, host, proc, last_seen FROM workers LIMIT 0",
          "SELECT endpoint, key, fingerprint, job_id FROM idempotency LIMIT 0",
          "SELECT job_id, due_at, attempts, owner FROM webhooks LIMIT 0")
# sqlite3's messages, and what they mean for someone starting the server.
HINTS = {"file is not a database": "not an SQLite database (another kind of file, or corrupt)",
          "malformed": "corrupt; restore it or move it away",
          "readonly": "read-only", "unable to open": "cannot be opened or created (read-only "
          "folder? missing permission?)", "disk is full": "the disk is full",
          "no such column": "another program's database, not a fastllava job store"}


def open_checked(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to the job store at `path` (":memory:": private), tables created, checked."""
    if path != ":memory:":
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            raise StoreUnavailable(f"sqlite job store {path!r}: folder {parent} does not exist")
    db = None
    try:
        db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                             check_same_thread=False)
        _create(db, busy_timeout_s)
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}")
        for sql in SHAPE:
            db.execute(sql)
        return db
    except sqlite3.Error as e:
        if db is not None:
            db.close()
        reason = " ".join(_explain(path, e).split())    # one line, whatever sqlite said
        raise StoreUnavailable(f"sqlite job store {path!r} cannot be used: {reason}") from None


def _create(db: sqlite3.Connection, busy_timeout_s: float) -> None:
    # Switching a new file to WAL needs an exclusive moment that SQLite's busy handler does not
    # wait for, so processes opening the same new file at once retry here.
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                # A write that reaches the file: a read-only file or a full disk fails here, at
                # startup, instead of at the first submit.
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('opened_at', ?)",
                           (repr(time.time()),))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _explain(path: str, e: sqlite3.Error) -> str:
    hint = next((h for k, h in HINTS.items() if k in str(e).lower()), None)
    if path != ":memory:":
        # A full disk often shows as a plain "disk I/O error" (creating the -wal file).
        free = shutil.disk_usage(Path(path).expanduser().resolve().parent).free
        if free < 1 << 20:
            hint = f"the disk is full ({free} bytes free)"
    return f"{hint} ({e})" if hint else str(e)
