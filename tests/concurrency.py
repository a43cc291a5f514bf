"""Helpers shared by the runtime tests: run calls together on threads, compare result lists,
check the engine is idle."""

from __future__ import annotations

import threading


def run_threads(fns: list, timeout_s: float = 300.0) -> list:
    """Call every fn on its own thread, all released at one barrier (so they join the same engine
    steps); their results in order. Any exception fails the test with the call that raised it."""
    out, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def worker(i):
        barrier.wait()
        try:
            out[i] = fns[i]()
        except Exception as e:   # reported below with the call that raised it
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a concurrent call never returned"
    assert not errors, f"{len(errors)} calls raised; first: call {errors[0][0]}: {errors[0][1]!r}"
    return out


def assert_same(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} results for {len(want)} requests"
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        i = bad[0]
        raise AssertionError(f"{what}: {len(bad)} of {len(want)} differ (indices {bad}); first, "
                             f"{i}: got {got[i]!r}, want {want[i]!r}")


def assert_idle(llava) -> None:
    stats = llava.stats()
    assert (stats["kv_pages_used"], stats["running"], stats["waiting"]) == (0, 0, 0), \
        f"the engine is not idle (leaked pages or requests): {stats}"
