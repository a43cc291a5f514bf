"""The preprocessing thread pool: one image's pieces of work (bands, the cache key) run on the
calling thread and `num_workers() - 1` pool threads. Pillow, numpy and ctypes release the GIL
in the work itself, so plain threads use every core."""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["even_spans", "num_workers", "run_tasks"]


@functools.lru_cache(maxsize=1)
def num_workers() -> int:
    """Threads that run one image's bands: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:    # not on Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor | None:
    n = num_workers() - 1     # the calling thread is the last worker
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="fastllava-bands") if n else None


def run_tasks(tasks: list) -> list:
    """Run zero-argument callables on the calling thread and the pool; their results, in order.

    Every thread takes the next unstarted task until none is left, so long and short tasks
    balance; a pool thread never waits on another task (no deadlock when several images
    share the pool), and a helper still queued behind another image's work when the caller
    has finished everything is cancelled, not waited for. The first exception is raised after
    every started task has finished.
    """
    results = [None] * len(tasks)
    todo = iter(range(len(tasks)))
    lock = threading.Lock()

    def drain():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = tasks[i]()

    pool = _pool()
    helpers = [] if pool is None or len(tasks) < 2 else [pool.submit(drain) for _ in range(min(
        num_workers(), len(tasks)) - 1)]
    try:
        drain()
    finally:
        errors = [f.exception() for f in helpers if not f.cancel()]
    for e in errors:
        if e is not None:
            raise e
    return results


def even_spans(n: int, parts: int) -> list[tuple[int, int]]:
    """0..n cut into `parts` contiguous (lo, hi) spans of near-equal length (empty ones dropped)."""
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
