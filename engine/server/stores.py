"""`open_store(url)`: the job store named by a `--queue` URL.

    sqlite:///jobs.db           relative path (to the working directory), SQLAlchemy's convention
    sqlite:////var/lib/x.db     absolute path (four slashes)
    sqlite:///:memory:          private in-memory store (not durable; tests only)
    redis://host:port/db        RedisJobStore (also rediss:// for TLS, unix:// for a socket)

Keyword arguments (lease_s, max_attempts, ...) go to the store's constructor.
"""

from __future__ import annotations

from typing import Any

from .jobs import JobStore

_FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db or redis://host:port/db"


def open_store(url: str, **kwargs: Any) -> JobStore:
    if not isinstance(url, str) or not url:
        raise ValueError(f"queue URL must be a non-empty string ({_FORMS}), got {url!r}")
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(f"queue URL {url!r}: a sqlite URL has no host; use {_FORMS}")
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"queue URL {url!r} names no database file; use {_FORMS}")
        from .store_sqlite import SqliteJobStore
        return SqliteJobStore(path, **kwargs)
    if scheme in ("redis", "rediss", "unix"):
        from .store_redis import RedisJobStore
        return RedisJobStore(url, **kwargs)
    raise ValueError(f"unsupported queue URL {url!r}: expected {_FORMS}")
