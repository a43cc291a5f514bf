"""Prefix caching in the block manager (content-hashed pages, ref counts, LRU eviction), driven
through the scheduler the way the engine drives it; the image-feature LRU; and a check that the
torch-free runtime modules import and schedule with torch made unimportable.

Page size S = 4. A step is schedule() → Batch.samples → update(tokens); Batch.starts tells where
a sequence's computation begins, so a prefix hit shows as a start past the cached pages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.scheduler import Scheduler, SchedulerConfig
from fastllava.runtime.sequence import ImageSpan, SamplingParams, Sequence

S = 4
IMG = 99     # image placeholder id


def make_sched(num_pages=32, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(8, 64), BlockManager(num_pages, S, caching))


def make_seq(prompt, max_tokens=4, images=()) -> Sequence:
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens), len(prompt) + max_tokens,
                    images)


def step(sched: Scheduler, *new: Sequence) -> dict:
    """Add `new`, run one step (token 5 for sampling rows); return {seq: (start, num_tokens)}."""
    for seq in new:
        sched.add(seq)
    batch = sched.schedule()
    rows = {seq: (start, n) for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens)}
    sched.update(batch, [5 if s else None for s in batch.samples])
    return rows


# -- hits -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [3, 8, 9, 10, 12])
def test_second_sequence_starts_after_cached_pages_and_shares_them(L):
    sched = make_sched()
    prompt = list(range(10, 10 + L))
    a, b = make_seq(prompt), make_seq(prompt)
    step(sched, a)
    rows = step(sched, b)
    hits = (L - 1) // S       # full pages, leaving >= 1 token to compute (its logits are needed)
    assert rows[b] == (hits * S, L - hits * S), f"L={L}: b computes {rows[b]}, want {hits} hits"
    assert b.block_table[:hits] == a.block_table[:hits], (a.block_table, b.block_table)
    assert not set(b.block_table[hits:]) & set(a.block_table), (a.block_table, b.block_table)
    refs = [sched.bm.ref_counts[p] for p in a.block_table]
    assert refs == [2] * hits + [1] * (len(refs) - hits), refs
    assert (a.metrics.cached_prompt_tokens, b.metrics.cached_prompt_tokens) == (0, hits * S)


def test_only_full_pages_are_shared_and_generated_pages_count():
    sched = make_sched()
    a = make_seq(range(20, 26), max_tokens=6)
    step(sched, a)                                      # 6 computed: page 1 is partial
    assert sched.bm.hash_of[a.block_table[1]] is None
    b = make_seq(list(range(20, 26)) + [70, 71, 72, 73])
    assert step(sched, b)[b] == (4, 6), b.block_table   # only page 0 hits
    step(sched)                                         # a computes position 7: page 1 is full
    c = make_seq(a.token_ids[:8] + [1])                 # a's prompt + its 2 generated tokens
    rows = step(sched, c)
    assert rows[c] == (8, 1) and c.block_table[:2] == a.block_table[:2], (rows, c.block_table)


def test_chained_hash_needs_the_whole_prefix():
    sched = make_sched()
    step(sched, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])       # page 1 equal, page 0 not
    assert sched.bm.match_prefix(other) == []


def test_pages_are_registered_only_after_update():
    sched = make_sched()
    prompt = list(range(30, 39))
    a, b = make_seq(prompt), make_seq(prompt)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.starts == [0, 0] and not set(a.block_table) & set(b.block_table), batch
    assert sched.bm.match_prefix(make_seq(prompt)) == [], "hit on pages whose KV is not written"
    sched.update(batch, [5, 5])
    c = make_seq(prompt)
    rows = step(sched, c)
    assert rows[c] == (8, 1) and c.block_table[:2] == a.block_table[:2], (rows, c.block_table)
    assert [sched.bm.hash_of[p] for p in b.block_table] == [None] * 3, "duplicate pages hashed"


def test_image_content_hash_decides_hits():
    sched = make_sched()
    prompt = [1, 2, 3, 4] + [IMG] * 8 + [5]            # image on pages 1 and 2

    def with_image(h):
        return make_seq(prompt, images=(ImageSpan(4, 8, h),))
    step(sched, with_image(b"cat"))
    dog, cat = with_image(b"dog"), with_image(b"cat")
    rows = step(sched, dog, cat)    # neither registered yet by the other: both see only "cat"
    assert rows[dog] == (4, 9), f"another image at the same token ids hit: {rows[dog]}"
    assert rows[cat] == (12, 1), f"the same image missed: {rows[cat]}"


# -- freed pages, eviction, reset -------------------------------------------------------------------

def test_freed_pages_stay_hittable_and_plain_pages_go_before_cached_ones():
    sched = make_sched(num_pages=6)
    bm = sched.bm
    a = make_seq(range(10, 19))                         # 9 tokens: pages 0, 1 full, 2 partial
    step(sched, a)
    a_pages = list(a.block_table)
    sched.abort(a)
    assert bm.num_used_pages == 0, bm.ref_counts
    assert list(bm.free_cached) == [a_pages[1], a_pages[0]], f"tail freed first: {bm.free_cached}"
    x = make_seq(range(100, 115), max_tokens=2)         # 4 pages: exactly the plain ones
    step(sched, x)
    assert set(a_pages[:2]) <= set(bm.page_of.values()) - set(x.block_table), x.block_table
    y = make_seq([200, 201, 202], max_tokens=1)         # 1 page: evicts the LRU cached page
    step(sched, y)
    sched.abort(x)
    b = make_seq(range(10, 19))
    assert bm.match_prefix(b) == [a_pages[0]], f"want only {a_pages[0]}: {bm.match_prefix(b)}"
    assert step(sched, b)[b] == (4, 5)


def test_eviction_is_least_recently_freed_first():
    sched = make_sched(num_pages=3)
    bm = sched.bm
    p, q = make_seq([1, 1, 1, 1, 2]), make_seq([3, 3, 3, 3, 4])     # 1 full page each
    for seq in (p, q):
        step(sched, seq)
        sched.abort(seq)
    p2 = make_seq([1, 1, 1, 1, 2])
    step(sched, p2)                     # revives p's page, so q's is now the least recent
    sched.abort(p2)
    r = make_seq([5, 5, 5, 5, 6])       # 2 pages: the plain one, then one eviction
    step(sched, r)
    assert bm.match_prefix(make_seq([3, 3, 3, 3, 4])) == [], "q's page should be evicted"
    assert len(bm.match_prefix(make_seq([1, 1, 1, 1, 2]))) == 1, "p's page should survive"


def test_reset_prefix_cache_forgets_every_hash():
    sched = make_sched()
    bm = sched.bm
    done, running = make_seq(range(40, 49), max_tokens=1), make_seq(range(50, 59))
    step(sched, done, running)
    free_before = bm.num_free_pages
    assert len(bm.page_of) == 4 and len(bm.free_cached) == 2, (bm.page_of, bm.free_cached)
    bm.reset_prefix_cache()
    assert not bm.page_of and not bm.free_cached and not any(bm.hash_of), bm.hash_of
    assert bm.num_free_pages == free_before
    x, y = make_seq(range(40, 49)), make_seq(range(50, 59))
    rows = step(sched, x, y)
    assert rows[x][0] == 0 and rows[y][0] == 0, rows


def test_disabled_prefix_caching_never_hits():
    sched = make_sched(caching=False)
    a = make_seq(range(10, 19), max_tokens=1)
    step(sched, a)
    b = make_seq(range(10, 19))
    assert step(sched, b)[b] == (0, 9) and b.metrics.cached_prompt_tokens == 0
    assert not sched.bm.page_of and not sched.bm.free_cached


def test_block_manager_rejects_an_empty_pool():
    with pytest.raises(ValueError, match="num_pages >= 1"):
        BlockManager(0, S)


# -- image features ---------------------------------------------------------------------------------

def test_image_cache_is_lru_by_rows():
    cache = ImageFeatureCache(capacity_rows=10)
    cache.put(b"a", "A", 4)
    cache.put(b"b", "B", 4)
    assert cache.get(b"a") == "A"                       # a is now the most recent
    cache.put(b"c", "C", 4)                             # 12 rows > 10: evict b
    assert (b"a" in cache, b"b" in cache, b"c" in cache, cache.rows) == (True, False, True, 8)
    cache.put(b"big", "X", 11)                          # larger than the whole cache: not kept
    assert b"big" not in cache and len(cache) == 2 and cache.rows == 8
    cache.put(b"a", "A2", 7)                            # refresh: replaces, then evicts c
    assert (cache.get(b"a"), b"c" in cache, cache.rows) == ("A2", False, 7)


def test_image_cache_counts_hits_and_misses_and_clears():
    cache = ImageFeatureCache(capacity_rows=8)
    cache.put(b"a", "A", 3)
    got = [cache.get(k) for k in (b"a", b"z", b"a", b"y")]
    assert got == ["A", None, "A", None] and (cache.hits, cache.misses) == (2, 2)
    cache.clear()
    assert len(cache) == 0 and cache.rows == 0 and cache.get(b"a") is None and cache.misses == 3
    with pytest.raises(ValueError, match="capacity_rows"):
        ImageFeatureCache(-1)


# -- no torch ---------------------------------------------------------------------------------------

NO_TORCH = """
import sys
assert "torch" not in sys.modules, "torch imported at interpreter start"

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test: {name}")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    import torch  # noqa: F401
    raise SystemExit("the torch blocker does not work")
except ImportError:
    pass
from fastllava.runtime import block_manager, config, image_cache, scheduler, sequence
config.RuntimeConfig()
image_cache.ImageFeatureCache(4).put(b"k", None, 2)
sched = scheduler.Scheduler(scheduler.SchedulerConfig(2, 8), block_manager.BlockManager(8, 4))
for prompt in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 6]):
    sched.add(sequence.Sequence(prompt, sequence.SamplingParams(max_tokens=2), 8))
steps = 0
while len(sched):
    batch = sched.schedule()
    sched.update(batch, [7 if s else None for s in batch.samples])
    steps += 1
assert steps == 3 and sched.bm.num_used_pages == 0, steps
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""


def test_runtime_core_imports_and_schedules_without_torch():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_TORCH)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.stdout, proc.stderr[-3000:])
