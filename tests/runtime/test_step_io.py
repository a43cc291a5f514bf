"""Device-side step inputs (`fastllava.runtime.step_io`) against the plain host constructions
they replace: the incrementally updated block tables equal tables rebuilt from the Python lists
after any sequence of page appends, frees (preemption), releases and row reuse; placeholders
resolve to the ids their step sampled, mixed with known ids or not."""

from __future__ import annotations

import random

import pytest

import torch

from fastllava.runtime.sequence import SamplingParams, Sequence
from fastllava.runtime.step_io import DeviceBlockTables, FutureTokens, parts_to_device


def test_device_block_tables_equal_tables_rebuilt_from_lists():
    rng = random.Random(0)
    tables = DeviceBlockTables(torch.device("cpu"), rows=2, width=2)   # both grow on the way
    seqs = [Sequence([1], SamplingParams(4), 100) for _ in range(9)]
    checked = 0
    for step in range(3000):
        seq = rng.choice(seqs)
        op = rng.random()
        if op < 0.5:
            seq.block_table.append(rng.randrange(1000))        # a new page: one new column
        elif op < 0.6:                                         # preempted: freed, refilled later
            seq.block_table.clear()
            seq.num_page_resets += 1
        elif op < 0.65:                                        # finished: its row is reused
            tables.release(seq)
            seq.block_table.clear()
            seq.num_page_resets += 1
        batch = [s for s in rng.sample(seqs, rng.randint(1, len(seqs))) if s.block_table]
        if rng.random() < 0.3:
            batch.sort(key=lambda s: tables._row.get(s.seq_id, 1 << 30))   # the view path
        if not batch:
            continue
        got = tables.gather(batch).clone()
        width = max(len(s.block_table) for s in batch)
        want = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch],
                            dtype=torch.int32)
        assert torch.equal(got, want), f"step {step}: {got.tolist()} != {want.tolist()}"
        checked += 1
    assert checked > 2000 and tables.table.shape[0] >= 8, (checked, tables.table.shape)


def test_future_tokens_resolve_placeholders():
    future = FutureTokens(4, torch.device("cpu"))
    first = future.put(torch.tensor([11, 12, 13]))
    second = future.put(torch.tensor([21, 22]))     # the other half: first stays readable
    for ids, want in [(first, [11, 12, 13]), (second[::-1], [22, 21]),
                      ([5, first[1], 7, second[0]], [5, 12, 7, 21]), ([1, 2], [1, 2])]:
        got = future.resolve(torch.tensor(ids), ids)
        assert got.tolist() == want, (ids, got.tolist(), want)
    assert all(p < 0 for p in first + second) and len(set(first + second)) == 5


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_parts_to_device_views_are_16_byte_aligned_and_exact(dtype):
    """Triton specializes pointers on 16-byte alignment: every view a step passes to a kernel must
    start aligned whatever the lengths before it, or serving compiles unwarmed variants."""
    rng = random.Random(3)
    for _ in range(50):
        parts = [[rng.randrange(-9, 99) for _ in range(rng.randrange(0, 11))] for _ in range(4)]
        views = parts_to_device(parts, dtype, torch.device("cpu"))
        assert [v.tolist() for v in views] == parts
        assert all(v.data_ptr() % 16 == 0 and v.dtype == dtype for v in views), \
            [(len(p), v.data_ptr() % 16) for p, v in zip(parts, views)]
