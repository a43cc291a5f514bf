"""What a decode step carries over from the step before, against the same inputs rebuilt from the
sequences' lists: `DecodeInputs` (positions, slots, lengths advanced on the device; ids from the
ring), `DeviceBlockTables.gather`'s same-batch shortcut, `SamplingBatches` (steps advanced on the
device) and `FutureTokens.latest`.

Random runs change the batch between steps in every way the engine can (arrivals, finishes,
reordering, a row preempted and refilled with other pages while its position moved by one, a
mixed step moving a row two tokens, page boundaries every 4 tokens): whatever happened, every
field must equal the list-built one, so a stale carried-over value fails. The same holds for the
inputs built in place in the decode graphs' static buffers (`DecodeInputs.fill`), whose padding
rows must stay padding, and whose carried-over rows must not survive another writer."""

from __future__ import annotations

import random

import pytest
import torch

from fastllava.runtime.cuda_graphs import batch_buckets
from fastllava.runtime.decode_inputs import DecodeInputs, StaticInputs
from fastllava.runtime.sampler import SamplingBatch, SamplingBatches
from fastllava.runtime.sequence import SamplingParams, Sequence
from fastllava.runtime.step_io import DeviceBlockTables, FutureTokens

S = 4
CPU = torch.device("cpu")


class Pages:
    """Distinct page ids, never reused (a reused id could hide a stale slot)."""

    def __init__(self):
        self.next = 0

    def fill(self, seq: Sequence) -> None:
        """Pages for every token of seq (the scheduler grows the table before a step)."""
        while len(seq.block_table) * S < len(seq.token_ids):
            seq.block_table.append(self.next)
            self.next += 1

    def refill(self, seq: Sequence) -> None:
        """Preempted and recomputed: other pages."""
        seq.block_table.clear()
        seq.num_page_resets += 1
        self.fill(seq)


def list_built(seqs: list[Sequence], future: FutureTokens) -> dict:
    positions = [len(s.token_ids) - 1 for s in seqs]
    ids = [s.token_ids[-1] for s in seqs]
    width = max(len(s.block_table) for s in seqs)
    i64, i32 = torch.int64, torch.int32
    return dict(
        ids=future.resolve(torch.tensor(ids), ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor([s.block_table[p // S] * S + p % S
                                   for s, p in zip(seqs, positions)]),
        block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table))
                                   for s in seqs], dtype=i32),
        cu_seqlens=torch.arange(len(seqs) + 1, dtype=i32),
        prefix_lens=torch.tensor(positions, dtype=i32),
        context_lens=torch.tensor([p + 1 for p in positions], dtype=i32),
        logits_rows=torch.arange(len(seqs), dtype=i64), has_prefix=any(positions))


def built_in_place(inputs: DecodeInputs, home: StaticInputs, batch: list[Sequence],
                   tables: DeviceBlockTables) -> dict:
    """`DecodeInputs.fill` into the graphs' static buffers, read back as `list_built`'s fields,
    after checking the padding rows up to the bucket: id 0, position 0, slot -1, context 0."""
    B = len(batch)
    bucket = next(b for b in batch_buckets(8) if b >= B)
    inputs.fill(batch, home, bucket)
    assert home.filled is not None
    for name, pad in (("ids", 0), ("positions", 0), ("slots", -1), ("context_lens", 0)):
        rows = getattr(home, name)[B:bucket]
        assert (rows == pad).all(), f"padding {name}: {rows.tolist()}"
    return dict(ids=home.ids[:B], positions=home.positions[:B], slot_mapping=home.slots[:B],
                block_tables=tables.gather(batch),
                cu_seqlens=torch.arange(B + 1, dtype=torch.int32),
                prefix_lens=home.prefix_lens[:B], context_lens=home.context_lens[:B],
                logits_rows=torch.arange(B), has_prefix=any(len(s.token_ids) > 1 for s in batch))


def overwrite(home: StaticInputs) -> None:
    """Another writer (the list-built DecodeGraphs.run, a TP broadcast): garbage everywhere."""
    home.ints.random_(-5, 10**6)
    home.lens.random_(-5, 10**6)
    home.filled = None


@pytest.mark.parametrize("into", ["own", "static"], ids=["own-tensors", "static-buffers"])
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_decode_inputs_equal_the_list_built_ones(overlap, into):
    """own tensors: `build` (the eager decode); static buffers: `fill` into the decode graphs'
    buffers (with now and then an eager build or a foreign write in between, which must not be
    carried over from)."""
    rng = random.Random(5 + overlap)
    pages, future = Pages(), FutureTokens(8, CPU)
    inputs, tables = DecodeInputs(CPU, S, future), DeviceBlockTables(CPU, rows=2, width=2)
    home = StaticInputs(8, CPU)
    packs = []
    inputs._pack = (lambda pack: lambda *a: packs.append(1) or pack(*a))(inputs._pack)
    batch: list[Sequence] = []
    pending = None                  # overlapped loop: (seqs, placeholders) of the step before
    for step in range(1500):
        op = rng.random()
        if op < 0.05 or not batch:                               # an arrival
            seq = Sequence([rng.randrange(1, 99) for _ in range(rng.randint(1, 9))],
                           SamplingParams(10**6), 10**6)
            batch.insert(rng.randrange(len(batch) + 1), seq)
        elif op < 0.08 and len(batch) > 1:                         # a finish
            gone = batch.pop(rng.randrange(len(batch)))
            tables.release(gone)
        elif op < 0.10:                                            # rows in another order
            rng.shuffle(batch)
        elif op < 0.13:                                            # preempted and recomputed
            pages.refill(rng.choice(batch))
        elif op < 0.15:                                            # a mixed step moved it on
            rng.choice(batch).token_ids.append(rng.randrange(1, 99))
        batch = batch[:8]
        for seq in batch:
            pages.fill(seq)
        want = list_built(batch, future)
        if into == "static":
            if rng.random() < 0.03:     # a step the graphs do not take (B > max batch size)
                ids_t, ctx = inputs.build(batch, tables.gather(batch))
                assert torch.equal(ids_t, want["ids"]) and \
                    torch.equal(ctx.slot_mapping, want["slot_mapping"]), step
            if rng.random() < 0.03:
                overwrite(home)
            got = built_in_place(inputs, home, batch, tables)
        else:
            ids_t, ctx = inputs.build(batch, tables.gather(batch))
            got = dict(ids=ids_t, **{k: getattr(ctx, k) for k in want if k != "ids"})
        for key, value in want.items():
            if key == "has_prefix":
                assert got[key] == value, (step, key)
                continue
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), \
                f"step {step} {key}: {got[key].tolist()} != {value.tolist()}"
            assert key == "ids" or got[key].data_ptr() % 16 == 0, (step, key)   # Triton
        sampled = torch.randint(1, 99, (len(batch),))
        if not overlap:
            for seq, token in zip(batch, sampled.tolist()):
                seq.token_ids.append(token)
            continue
        placeholders = future.put(sampled)
        if pending is not None:     # the step before's tokens arrive after this launch
            for seq, (index, token) in pending.items():
                if seq.token_ids[index] < 0:
                    seq.token_ids[index] = token
        pending = {}
        for seq, p, token in zip(batch, placeholders, sampled.tolist()):
            pending[seq] = (len(seq.token_ids), token)
            seq.token_ids.append(p)
    assert 200 < len(packs) < 1200, f"packed {len(packs)} of 1500 steps: a path went untested"


def test_block_tables_same_batch_shortcut_equals_rebuilt_tables():
    rng = random.Random(1)
    tables = DeviceBlockTables(CPU, rows=2, width=2)
    seqs = [Sequence([1], SamplingParams(4), 100) for _ in range(6)]
    batch = seqs[:3]
    for step in range(2000):
        if rng.random() < 0.1:
            batch = [s for s in rng.sample(seqs, rng.randint(1, len(seqs)))]
        for seq in batch:
            if rng.random() < 0.3:
                seq.block_table.append(rng.randrange(1000))        # a page opened
            elif rng.random() < 0.02:                              # preempted, refilled
                seq.block_table[:] = [rng.randrange(1000) for _ in seq.block_table[:2]]
                seq.num_page_resets += 1
            if not seq.block_table:
                seq.block_table.append(rng.randrange(1000))
        if rng.random() < 0.02:                                    # finished: row reused
            gone = rng.choice(batch)
            tables.release(gone)
            gone.block_table[:] = [rng.randrange(1000)]
            gone.num_page_resets += 1
        got = tables.gather(list(batch)).clone()
        width = max(len(s.block_table) for s in batch)
        want = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch],
                            dtype=torch.int32)
        assert torch.equal(got, want), f"step {step}: {got.tolist()} != {want.tolist()}"


def test_sampling_batches_equal_fresh_builds():
    rng = random.Random(2)
    seqs = [Sequence([1, 2, 3], SamplingParams(10**6, temperature=t, top_p=p, seed=i,
                                               logprobs=lp), 10**6)
            for i, (t, p, lp) in enumerate([(0.7, 0.9, None), (0.0, 1.0, None), (1.0, 1.0, 2),
                                            (0.0, 1.0, None)])]
    cache, reused = SamplingBatches(CPU), 0
    batch = seqs[:2]
    for step in range(400):
        op = rng.random()
        if op < 0.1:
            batch = rng.sample(seqs, rng.randint(1, len(seqs)))
        for seq in batch:
            seq.token_ids += [5] * (2 if op > 0.95 else 1)        # a mixed step: two tokens
        before = cache._batch
        got = cache.get(batch)
        reused += got is before
        want = SamplingBatch.build([(s.params.temperature, s.params.top_p, s.params.seed,
                                     len(s.token_ids) - s.prompt_len) for s in batch], CPU)
        if got.all_greedy:
            assert want.all_greedy and got.temperature.shape == want.temperature.shape
        else:
            for field in ("temperature", "top_p", "seeds", "steps"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (step, field)
            assert (got.all_greedy, got.any_top_p) == (want.all_greedy, want.any_top_p)
        assert cache.any_logprobs == any(s.params.logprobs is not None for s in batch)
    assert 150 < reused < 380, reused


def test_future_tokens_latest_is_the_ring_view_of_exactly_the_last_put():
    future = FutureTokens(4, CPU)
    first = future.put(torch.tensor([11, 12, 13]))
    assert future.latest(first).tolist() == [11, 12, 13]
    assert future.latest(first[:2]) is None and future.latest(first[::-1]) is None
    second = future.put(torch.tensor([21, 22]))
    assert future.latest(first) is None and future.latest(second).tolist() == [21, 22]
    assert future.latest([]) is None and future.latest([5, 6]) is None
