"""The scheduler's steady-decode shortcuts against its general path, on the same states.

`Scheduler.schedule` builds an all-decode batch directly when nothing waits and every running
sequence decodes uncapped and gets its next page without preempting (`_schedule_steady_decode`);
`advance` has a loop of its own for decode batches. Random runs (arrivals, cancels, stops, tiny
page pools so that preemption happens, page size 4 so that page boundaries come every few tokens)
check at every step, on a deep copy of the whole state, that the general path gives the same
batch and leaves the same state (pages taken, in the same order), in both engine loops: the
serial one (update) and the overlapped one (advance now, resolve a step later, capped rows).
No torch.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.scheduler import Batch, Scheduler, SchedulerConfig
from fastllava.runtime.sequence import SamplingParams, Sequence

S = 4
STOP = 3


def state(sched: Scheduler) -> tuple:
    """Everything a schedule call may change, by value."""
    seqs = sched.running + list(sched.waiting)
    bm = sched.bm
    return ([(s.seq_id, s.status, s.num_computed, list(s.block_table), s.num_page_resets,
              list(s.token_ids)) for s in seqs],
            list(bm.free_plain), list(bm.free_cached), list(bm.ref_counts))


def rows(batch: Batch | None) -> tuple | None:
    if batch is None:
        return None
    return ([s.seq_id for s in batch.seqs], batch.num_tokens, batch.starts, batch.is_decode,
            batch.samples)


def random_seq(rng: random.Random) -> Sequence:
    prompt = [rng.randrange(4, 40) for _ in range(rng.randint(1, 9))]
    max_tokens = rng.randint(1, 14)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=(STOP,) if rng.random() < 0.5 else ())
    return Sequence(prompt, params, len(prompt) + rng.choice((max_tokens, rng.randint(1, 14))))


def schedule_both(sched: Scheduler):
    """schedule() on sched and the general path on a deep copy (the twin): same batch, same
    state. Returns (batch, the twin's batch, the twin, the shortcut's batch or None)."""
    twin = copy.deepcopy(sched)
    want = twin._schedule_general()
    quick = copy.deepcopy(sched)._schedule_steady_decode()
    got = sched.schedule()
    assert rows(got) == rows(want), (rows(got), rows(want))
    assert state(sched) == state(twin), "the shortcut left another state than the general path"
    return got, want, twin, quick


def test_pages_go_in_seq_id_order_whatever_the_running_order():
    """Two sequences open a page in the same step while `running` is not in seq_id order (as
    after a preemption and re-admission): the general path hands out pages oldest first, and so
    must the shortcut."""
    sched = Scheduler(SchedulerConfig(4, 16, 512), BlockManager(16, S))
    for _ in range(3):
        sched.add(Sequence([5, 6, 7], SamplingParams(max_tokens=20), 40))
    sched.update(sched.schedule(), [9, 9, 9])          # prefill: 3 + 1 tokens, one page each
    sched.running.reverse()
    for _ in range(6):
        batch, _, _, quick = schedule_both(sched)
        assert quick is not None
        sched.update(batch, [9] * len(batch.seqs))
    tables = {s.seq_id: s.block_table for s in sched.running}
    assert [tables[i][1] for i in sorted(tables)] == [3, 4, 5], tables   # taken oldest first


def run(seed: int, overlap: bool) -> tuple[int, int]:
    """One random run; returns (steps the shortcut took, all-decode steps it left alone)."""
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(rng.choice((3, 4, 8)), 16, 512),
                      BlockManager(rng.choice((6, 7)), S))
    taken = declined = 0
    previous = None                       # overlapped loop: the step whose tokens are pending
    for _ in range(1000):
        if rng.random() < 0.05:
            seq = random_seq(rng)
            if sched.bm.pages_for(seq.max_len) <= sched.bm.num_pages:
                sched.add(seq)
        if rng.random() < 0.02 and sched.running:
            sched.abort(rng.choice(sched.running))
        all_decoding = not sched.waiting and bool(sched.running) and all(
            s.is_decoding for s in sched.running)
        got, want, twin, quick = schedule_both(sched)
        taken += quick is not None
        declined += all_decoding and quick is None   # capped, or short of pages: general path
        if got is None:
            if previous is not None:
                sched.resolve(previous, [rng.randrange(20) for _ in previous])
                previous = None
            continue
        if not overlap:
            sched.update(got, [rng.randrange(20) if s else None for s in got.samples])
            continue
        placeholders = [-(1 + i) if s else None for i, s in enumerate(got.samples)]
        twin_batch = dataclasses.replace(   # the same step on the twin, through the general loop
            want, seqs=[next(t for t in twin.running if t.seq_id == s.seq_id) for s in got.seqs],
            is_decode=False)
        pending = sched.advance(got, placeholders)
        twin_pending = twin.advance(twin_batch, placeholders)
        assert [(s.seq_id, n, i) for s, n, i in pending] == \
            [(s.seq_id, n, i) for s, n, i in twin_pending]
        assert state(sched) == state(twin)
        if previous is not None:
            sched.resolve(previous, [rng.randrange(20) if i is not None else None
                                     for _, _, i in previous])
        previous = pending
    return taken, declined


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_shortcuts_equal_the_general_path(overlap):
    counts = [run(seed, overlap) for seed in range(6)]
    taken, declined = (sum(c) for c in zip(*counts))
    # Both branches ran often: the shortcut, and all-decode states it must leave alone.
    assert taken > 600 and declined > 5, counts
