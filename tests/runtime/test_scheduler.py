"""The scheduler driven directly, with the model simulated: budgets, chunked prefill, FIFO
admission, preemption (recompute) order, and no page leaked after random interleavings.

A "step" here is what the engine does: schedule(), read Batch.samples (before update, which grows
the sequences), pick a token for each sampling row (None elsewhere), update(). Tokens are chosen
by the test, so every output is derived from the inputs, never recorded. Page size S = 4 and tiny
pools, so page boundaries and running out of pages happen within a few tokens. No torch.
"""

from __future__ import annotations

import random

import pytest

from fastllava.runtime.block_manager import BlockManager, page_hash
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.scheduler import Scheduler, SchedulerConfig
from fastllava.runtime.sequence import ImageSpan, SamplingParams, Sequence, Status

S = 4      # tokens per KV page


def make_sched(num_pages=64, budget=16, max_seqs=8, caching=True, prefill_while_decoding=512):
    return Scheduler(SchedulerConfig(max_seqs, budget, prefill_while_decoding),
                     BlockManager(num_pages, S, caching))


def make_seq(prompt, max_tokens=8, max_len=None, images=(), stop=()) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(stop))
    return Sequence(list(prompt), params, max_len or len(prompt) + max_tokens, images)


def token_for(seq: Sequence) -> int:
    """The token the simulated model samples: a function of (sequence, position) only, so a
    recomputed sequence must continue with exactly the tokens it would have had."""
    return 1000 + 100 * seq.seq_id + len(seq)


def step(sched: Scheduler, pick=token_for):
    """One engine step; returns (batch, rows, finished) with rows = [(seq, start, n, samples)]."""
    batch = sched.schedule()
    assert batch is not None, f"nothing scheduled with {len(sched.waiting)} waiting"
    rows = list(zip(batch.seqs, batch.starts, batch.num_tokens, batch.samples))
    finished = sched.update(batch, [pick(seq) if s else None for seq, _, _, s in rows])
    return batch, rows, finished


def drain(sched: Scheduler, max_steps=500) -> list:
    """Step until every sequence has finished; return the rows of every step."""
    history = []
    for _ in range(max_steps):
        if not len(sched):
            return history
        history.append(step(sched)[1])
    raise AssertionError(f"not drained after {max_steps} steps: {sched.running} {sched.waiting}")


# -- budgets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, max_seqs", [(8, 3), (13, 5), (6, 6)])
def test_budget_and_max_num_seqs_hold_and_decodes_go_first(budget, max_seqs):
    sched = make_sched(budget=budget, max_seqs=max_seqs)
    rng = random.Random(budget)
    seqs = [make_seq(range(1, rng.randint(2, 30)), max_tokens=rng.randint(1, 9)) for _ in range(12)]
    for seq in seqs:
        sched.add(seq)
    while len(sched):
        decoding = [s for s in sched.running if s.is_decoding]
        batch, rows, _ = step(sched)
        total = sum(batch.num_tokens)
        assert total <= budget, f"{total} tokens scheduled, budget {budget}: {rows}"
        assert len(rows) <= max_seqs and len(sched.running) <= max_seqs, (rows, sched.running)
        n_of = {seq.seq_id: n for seq, _, n, _ in rows}
        missing = [s for s in decoding if n_of.get(s.seq_id) != 1]
        assert not missing, f"running decodes without their token this step: {missing}"
        cut = [(seq, start, n) for seq, start, n, samples in rows if not samples]
        assert not cut or total == budget, f"a prefill was cut short below the budget: {cut}"
    assert all(s.num_generated == s.params.max_tokens for s in seqs), seqs


def test_budget_below_max_num_seqs_is_rejected():
    msg = r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"
    with pytest.raises(ValueError, match=msg):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= max_num_seqs"):
        RuntimeConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding must be >= 1"):
        RuntimeConfig(max_prefill_tokens_while_decoding=0)


# -- chunked prefill --------------------------------------------------------------------------------

def test_long_prompt_is_chunked_while_decodes_ride_along():
    budget = 16
    sched = make_sched(budget=budget)
    short, long_ = make_seq([5, 6, 7], max_tokens=20), make_seq(range(100, 150), max_tokens=3)
    sched.add(short)
    sched.add(long_)
    chunks = []
    while long_.num_generated == 0:
        batch, rows, _ = step(sched)
        row = {seq.seq_id: (start, n, s) for seq, start, n, s in rows}
        start, n, samples = row[long_.seq_id]
        others = sum(n for seq, _, n, _ in rows if seq is not long_)
        assert n == min(50 - start, budget - others), f"chunk {n} at {start}, others {others}"
        assert samples == (start + n == 50), f"samples={samples} for chunk [{start}, {start + n})"
        if chunks:     # the short sequence decodes (one token) in every chunk step after its prompt
            assert row[short.seq_id][1] == 1, rows
        assert batch.is_decode is False, f"a prefill step reported is_decode: {rows}"
        chunks.append((start, n))
    assert [s for s, _ in chunks] == [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    assert sum(n for _, n in chunks) == 50 and len(chunks) == 4, chunks
    batch, rows, _ = step(sched)       # now both decode
    assert batch.is_decode and [n for _, _, n, _ in rows] == [1, 1], rows


@pytest.mark.parametrize("bound", [1, 5, 8])
def test_prefill_is_bounded_while_anyone_decodes_and_whole_when_idle(bound):
    """A step that decodes holds all its prefill tokens (running chunks and admissions) to the
    bound; a step with nothing decoding takes the whole budget."""
    budget = 32
    sched = make_sched(budget=budget, prefill_while_decoding=bound)
    first = make_seq(range(100, 140), max_tokens=90)       # 40 prompt tokens
    sched.add(first)
    _, rows, _ = step(sched)
    assert [n for _, _, n, _ in rows] == [budget], rows      # idle: a whole-budget chunk
    _, rows, _ = step(sched)
    assert [n for _, _, n, _ in rows] == [8], rows           # rest of the prompt, still alone
    late = [make_seq(range(200 + 50 * i, 230 + 50 * i), max_tokens=2) for i in range(2)]
    for seq in late:
        sched.add(seq)
    prefilled = 0
    while any(seq.num_generated == 0 for seq in late):
        batch, rows, _ = step(sched)
        decodes = [seq for seq, _, n, _ in rows if seq is first]
        assert decodes and not batch.is_decode, rows         # `first` decodes every step
        prefill = sum(n for seq, start, n, _ in rows if start < seq.prompt_len)
        assert prefill == min(bound, 60 - prefilled), (prefill, bound, rows)
        prefilled += prefill
    assert prefilled == 60


# -- admission --------------------------------------------------------------------------------------

def test_admission_is_fifo_by_add_order():
    sched = make_sched(budget=64, max_seqs=2)
    a, b, c, d = (make_seq([i] * 3, max_tokens=2) for i in range(1, 5))
    for seq in (c, a, d, b):       # add order, not creation order, is arrival order
        sched.add(seq)
    admitted = []
    for rows in drain(sched):
        admitted += [seq for seq, start, _, _ in rows if start == 0]
    assert admitted == [c, a, d, b], admitted


def test_head_that_does_not_fit_blocks_later_ones():
    sched = make_sched(num_pages=6, budget=32)
    a = make_seq(range(13), max_tokens=3)            # 4 pages
    b, c = make_seq(range(50, 60), max_tokens=2), make_seq([1, 2, 3], max_tokens=2)  # 3, 1 pages
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.add(c)
    step(sched)                                      # 2 pages free: b needs 3, c (1) must wait
    assert sched.running == [a] and list(sched.waiting) == [b, c], (sched.running, sched.waiting)
    assert sched.bm.num_free_pages == 2
    sched.abort(a)
    _, rows, _ = step(sched)
    assert [(seq, start) for seq, start, _, _ in rows] == [(b, 0), (c, 0)], rows


def test_sequence_that_can_never_fit_is_rejected_at_add():
    sched = make_sched(num_pages=6)
    with pytest.raises(ValueError, match="max_len 25 exceeds the KV cache"):
        sched.add(make_seq([1, 2], max_len=25))       # 7 pages > 6
    sched.add(make_seq([1, 2], max_len=24))           # exactly the pool
    assert len(sched.waiting) == 1


# -- preemption -------------------------------------------------------------------------------------

def test_newest_is_preempted_first_and_recomputed_later():
    sched = make_sched(num_pages=4, caching=False)
    a, b, c, d = (make_seq([i, i, i], max_tokens=8) for i in range(1, 5))   # 1 page each at first
    e = make_seq([9, 9], max_tokens=2)
    for seq in (a, b, c, d):
        sched.add(seq)
    step(sched)
    sched.add(e)
    step(sched)
    _, rows, _ = step(sched)       # every decode needs its second page: a takes d's, b takes c's
    assert [seq for seq, *_ in rows] == [a, b], rows
    assert list(sched.waiting) == [c, d, e], sched.waiting
    for seq in (c, d):
        assert seq.status is Status.WAITING and seq.block_table == [] and seq.num_computed == 0
        assert seq.metrics.num_preemptions == 1 and len(seq) == 5, seq
    history = drain(sched)
    recompute = [(start, n, s) for rows in history for seq, start, n, s in rows
                 if seq is c and start == 0]
    assert recompute == [(0, 5, True)], f"c recomputes prompt + 2 generated tokens: {recompute}"
    for seq in (a, b, c, d, e):    # nothing lost or repeated across preemptions
        want = [1000 + 100 * seq.seq_id + p for p in range(seq.prompt_len, len(seq))]
        assert seq.token_ids[seq.prompt_len:] == want, (seq, seq.token_ids, want)
        assert seq.finish_reason == "length"
    assert sched.bm.num_used_pages == 0


def test_sequence_preempts_itself_rather_than_an_older_one():
    sched = make_sched(num_pages=4, budget=8, caching=False)
    old = make_seq(range(100, 113), max_tokens=2)    # 13 tokens, created first: older
    new = make_seq([1, 2, 3], max_tokens=6)
    sched.add(new)             # admitted first, so it decodes while `old` is still prefilling
    sched.add(old)
    step(sched)                # new: 3 tokens (1 page); old: 5 tokens (2 pages)
    step(sched)                # new decodes; old: 7 more tokens (3 pages): the pool is full
    old_pages = list(old.block_table)
    _, rows, _ = step(sched)   # new needs a page; the only candidate victim is older
    assert [(seq, start, n) for seq, start, n, _ in rows] == [(old, 12, 1)], rows
    assert list(sched.waiting) == [new] and new.metrics.num_preemptions == 1, sched.waiting
    assert old.metrics.num_preemptions == 0 and old.block_table[:3] == old_pages[:3], old
    drain(sched)
    assert new.num_generated == 6 and old.num_generated == 2, (new, old)


def test_sequences_scheduled_this_step_are_never_victims():
    sched = make_sched(num_pages=4, budget=8, caching=False)
    old = make_seq(range(100, 114), max_tokens=2)    # older, still prefilling in step 2
    new = make_seq([1, 2, 3, 4], max_tokens=8)
    sched.add(new)
    sched.add(old)
    step(sched)                # new: 4 tokens (1 page); old: 4 tokens (1 page)
    _, rows, _ = step(sched)   # new decodes first (takes a page); old needs 2, 1 is left
    assert [(seq, start, n) for seq, start, n, _ in rows] == [(new, 4, 1)], rows
    assert list(sched.waiting) == [old] and old.metrics.num_preemptions == 1, sched.waiting
    assert new.metrics.num_preemptions == 0 and len(new.block_table) == 2, new


def test_no_admission_in_a_step_that_preempted():
    """The victim goes back to waiting; re-admitting it in the same step throws its KV away
    for nothing (it restarts from token 0 in pages it just gave up)."""
    sched = make_sched(num_pages=3, budget=3, max_seqs=2, caching=False)
    old, new = make_seq([1], max_tokens=8), make_seq([2, 3], max_tokens=8)
    sched.add(old)
    sched.add(new)
    for _ in range(4):         # new takes its 2nd page at position 4, the last free one
        step(sched)
    _, rows, _ = step(sched)   # old needs its 2nd page: new is preempted
    assert new.metrics.num_preemptions == 1, new
    assert [seq for seq, *_ in rows] == [old], f"preempted and re-admitted in one step: {rows}"
    assert list(sched.waiting) == [new] and new.num_computed == 0, sched.waiting


# -- no leaks under random interleavings ------------------------------------------------------------

STOP, IMG = 3, 99        # a stop id the random "model" samples now and then; an image placeholder


def random_seq(rng: random.Random) -> Sequence:
    """Prompts share leading pages (prefix hits), some carry one of two images at the same ids."""
    head = rng.choice(([7] * 9, list(range(20, 29)), [1] + [IMG] * 8))
    prompt = head[:rng.randint(1, 9)] + [rng.randrange(40) for _ in range(rng.randint(0, 8))]
    images = ()
    if head[0] == 1 and len(prompt) > 1:
        length = sum(1 for t in prompt[1:9] if t == IMG)
        images = (ImageSpan(1, length, rng.choice((b"cat", b"dog"))),) if length else ()
    max_tokens = rng.randint(1, 10)
    max_len = len(prompt) + rng.choice((max_tokens, rng.randint(1, max_tokens), 30))
    return make_seq(prompt, max_tokens, max_len, images, stop=(STOP,))


def content(seq: Sequence, j: int):
    """What position j's KV depends on besides the prefix: the token, or (image hash, offset)."""
    for img in seq.images:
        if img.start <= j < img.end:
            return img.content_hash, j - img.start
    return seq.token_ids[j]


def check_invariants(sched: Scheduler) -> None:
    bm = sched.bm
    holders = [0] * bm.num_pages
    for seq in sched.running:
        assert seq.status is Status.RUNNING, seq
        assert len(set(seq.block_table)) == len(seq.block_table), (seq, seq.block_table)
        assert len(seq.block_table) == bm.pages_for(seq.num_computed), (seq, seq.block_table)
        prev = b""
        for i, page in enumerate(seq.block_table):
            holders[page] += 1
            full = (i + 1) * S <= seq.num_computed
            prev = page_hash(prev, seq, i, S) if full else None
            assert bm.hash_of[page] in (None, prev), f"{seq}: page {i} (id {page}) has a wrong hash"
    for seq in sched.waiting:
        assert seq.status is Status.WAITING and not seq.block_table and not seq.num_computed, seq
    ids = [s.seq_id for s in sched.running] + [s.seq_id for s in sched.waiting]
    assert len(ids) == len(set(ids)), f"a sequence is queued twice: {sorted(ids)}"
    bad = [(p, h, r) for p, (h, r) in enumerate(zip(holders, bm.ref_counts)) if h != r]
    assert not bad, f"{len(bad)} pages with ref count != holders; first (page, holders, ref): " \
        f"{bad[0]}"
    used = [p for p in range(bm.num_pages) if holders[p]]
    plain, cached = list(bm.free_plain), list(bm.free_cached)
    assert sorted(used + plain + cached) == list(range(bm.num_pages)), (used, plain, cached)
    assert all(bm.hash_of[p] is None for p in plain), [(p, bm.hash_of[p]) for p in plain]
    assert all(bm.hash_of[p] is not None for p in cached), [(p, bm.hash_of[p]) for p in cached]
    hashed = {h: p for p, h in enumerate(bm.hash_of) if h is not None}
    assert len(hashed) == sum(h is not None for h in bm.hash_of) and hashed == bm.page_of


def random_step(sched: Scheduler, rng: random.Random, kv: dict, fed: dict) -> None:
    """One step; the simulated KV cache maps (page, slot) to everything that position depends on
    (its whole prefix), so a wrong prefix hit or a lost page reads back the wrong content."""
    batch, bm, cfg = sched.schedule(), sched.bm, sched.config
    if batch is None:
        assert not len(sched), f"none scheduled: running {sched.running}, waiting {sched.waiting}"
        return
    rows = list(zip(batch.seqs, batch.starts, batch.num_tokens, batch.samples))
    assert sum(batch.num_tokens) <= cfg.max_num_batched_tokens and len(rows) <= cfg.max_num_seqs
    decodes = [n == 1 and start >= seq.prompt_len and start + 1 == len(seq)
               for seq, start, n, _ in rows]
    if any(decodes):
        prefill = sum(n for (_, _, n, _), d in zip(rows, decodes) if not d)
        assert prefill <= cfg.max_prefill_tokens_while_decoding, (prefill, rows)
    assert batch.is_decode == all(decodes), (batch.is_decode, rows)
    for seq, start, n, _ in rows:
        assert seq.status is Status.RUNNING and start == seq.num_computed, (seq, start)
        assert n >= 1 and start + n <= len(seq), (seq, start, n)
        assert len(seq.block_table) == bm.pages_for(start + n), (seq, start, n, seq.block_table)
        prefix = [content(seq, j) for j in range(start + n)]
        wrong = [j for j in range(start) if kv.get((seq.block_table[j // S], j % S))
                 != tuple(prefix[:j + 1])]
        assert not wrong, f"{seq} would attend to wrong KV at {len(wrong)} positions: {wrong[:5]}"
        for j in range(start, start + n):
            page = seq.block_table[j // S]
            assert bm.ref_counts[page] == 1, f"{seq} writes position {j} into shared page {page}"
            kv[page, j % S] = tuple(prefix[:j + 1])
    if rng.random() < 0.1:                         # cancelled while its step runs
        sched.abort(rng.choice(rows)[0])
    tokens = [rng.randrange(20) if s else None for _, _, _, s in rows]
    for (seq, *_), token in zip(rows, tokens):
        if token is not None and seq.status is Status.RUNNING:
            fed[seq.seq_id].append(token)
    for seq in sched.update(batch, tokens):
        assert seq.status is Status.FINISHED and not seq.block_table, seq
        stopped = seq.token_ids[-1] == STOP
        assert seq.finish_reason == ("stop" if stopped else "length"), (seq, seq.token_ids)
        assert stopped or seq.num_generated == seq.params.max_tokens or len(seq) == seq.max_len


@pytest.mark.parametrize("prefill_while_decoding", [512, 3])
@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_leak_nothing(seed, prefill_while_decoding):
    rng = random.Random(seed)
    sched = make_sched(num_pages=10, budget=rng.choice((8, 12, 16)), max_seqs=rng.choice((3, 4, 6)),
                       prefill_while_decoding=prefill_while_decoding)
    bm, kv, fed, seqs = sched.bm, {}, {}, []
    for _ in range(800):
        op = rng.random()
        if op < 0.35:
            seq = random_seq(rng)
            if bm.pages_for(seq.max_len) > bm.num_pages:
                with pytest.raises(ValueError, match="exceeds the KV cache"):
                    sched.add(seq)
            else:
                sched.add(seq)
                seqs.append(seq)
                fed[seq.seq_id] = []
        elif op < 0.85:
            random_step(sched, rng, kv, fed)
        elif op < 0.96 and len(sched):
            seq = rng.choice(sched.running + list(sched.waiting))
            sched.abort(seq)
            assert seq.status is Status.FINISHED and seq.finish_reason == "cancelled", seq
        elif op >= 0.96:
            bm.reset_prefix_cache()
        check_invariants(sched)
    for seq in (sched.running + list(sched.waiting))[::2]:
        sched.abort(seq)
    for _ in range(1000):
        if not len(sched):
            break
        random_step(sched, rng, kv, fed)
        check_invariants(sched)
    assert not len(sched), f"not drained: {sched.running} {sched.waiting}"
    assert bm.num_used_pages == 0 and not any(bm.ref_counts), bm.ref_counts
    assert not bm._hashes and not bm._committed, "per-sequence memos leaked"
    lost = [(s, s.token_ids[s.prompt_len:], fed[s.seq_id]) for s in seqs
            if s.token_ids[s.prompt_len:] != fed[s.seq_id]]
    assert not lost, f"{len(lost)} sequences lost or repeated tokens; first: {lost[0]}"
    preemptions = sum(s.metrics.num_preemptions for s in seqs)
    cached = sum(s.metrics.cached_prompt_tokens for s in seqs)
    assert preemptions > 0 and cached > 0, f"not exercised: {preemptions} preemptions, {cached} hit"


# -- counters (the server's stats line and /metrics) ------------------------------------------------

@pytest.mark.parametrize("caching", [True, False])
def test_token_and_prefix_counters_match_what_ran(caching):
    """prompt_tokens = prefilled tokens (chunks summed, cache hits skipped), generation_tokens =
    sampled tokens, prefix counters = tokens looked up / found at admission."""
    sched = make_sched(budget=5, max_seqs=2, caching=caching)
    prompt = list(range(1, 11))          # 10 tokens: 2 full pages can be shared, 1 partial
    first = make_seq(prompt, max_tokens=3)
    sched.add(first)
    rows = drain(sched)
    sched.add(make_seq(prompt, max_tokens=4))
    rows += drain(sched)
    computed = sum(n for step_rows in rows for _, start, n, _ in step_rows)
    sampled = sum(s for step_rows in rows for *_, s in step_rows)
    hits = 2 * S if caching else 0
    assert sched.num_generation_tokens == sampled == 3 + 4
    # Every computed token is either a prompt token or the previous sampled one (decode).
    assert sched.num_prompt_tokens == computed - (sampled - 2) == 2 * len(prompt) - hits
    assert sched.num_prefix_query_tokens == 2 * len(prompt)
    assert sched.num_prefix_hit_tokens == hits
