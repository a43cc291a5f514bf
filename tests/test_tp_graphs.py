"""Decode buckets and the KV pool under tensor parallelism.

CPU (gloo, 2 ranks): every rank decodes through its padded static buffers (runtime/tp_graphs.py,
the code CUDA captures, run eagerly), rank 0's inputs broadcast inside the step; greedy tokens
equal TP=1's for a batch padded up to its bucket. The ranks agree on the smallest rank's KV pool
(runtime/tp_memory.py) when their budgets differ, and all refuse, naming the rank, when one rank
cannot hold a request.
GPU (>= 2 CUDA GPUs, NCCL): the decode graphs are captured with the collectives inside them and
replay the same tokens as TP=1 with graphs.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
import threading

import pytest
import torch
import torch.distributed as dist

import fp8_checkpoint as ck
from fastllava import LLaVA
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.memory_plan import GB, Measured, plan_kv_pool
from fastllava.runtime.sequence import SamplingParams, Sequence
from fastllava.runtime.tp_comm import TPComm
from fastllava.runtime.tp_graphs import TPDecodeGraphs
from fastllava.runtime.tp_memory import PoolParams, measure_and_agree
from runtime.test_memory_plan import FakeMemory

MB = 1 << 20
NEW_TOKENS = 6


def greedy(llava: LLaVA, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts added at once, stepped on this thread (schedule → run → update): the decode
    steps carry every live sequence, so the batch size is len(prompts) until one finishes."""
    sched, runner = llava.engine.scheduler, llava.engine.runner
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_ids=())
    seqs = [Sequence(list(p), params, llava.max_len) for p in prompts]
    for seq in seqs:
        sched.add(seq)
    live = len(seqs)
    while live:
        batch = sched.schedule()
        for seq in sched.update(batch, runner.run(batch)):
            runner.release(seq)
            live -= 1
    return [seq.token_ids[len(p):] for seq, p in zip(seqs, prompts)]


def batch_sizes(graphs) -> list[int]:
    """Record the batch size of every decode step that goes through `graphs` (rank 0's)."""
    seen, run = [], graphs.run_batch
    graphs.run_batch = lambda seqs, *a: seen.append(len(seqs)) or run(seqs, *a)
    return seen


def test_tp2_decodes_padded_buckets_like_tp1(tiny_next):
    """3 sequences of different lengths decode as one batch padded to bucket 4 on both ranks;
    the tokens are TP=1's (whose CPU decode runs eagerly, unpadded)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 17, 30)]
    one = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")
    try:
        assert one.engine.runner.graphs is None
        want = greedy(one, prompts)
    finally:
        one.close()
    two = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        graphs = two.engine.runner.graphs
        assert isinstance(graphs, TPDecodeGraphs) and not graphs.graphs   # eager on CPU
        seen = batch_sizes(graphs)
        got = greedy(two, prompts)
        single = greedy(two, prompts[1:2])                                 # bucket 1, no padding
    finally:
        two.close()
    assert got == want, f"TP=2 padded decode differs from TP=1:\n tp2 {got}\n tp1 {want}"
    assert single == want[1:2]
    assert 3 in seen and graphs.bucket(3) == 4, f"no padded decode step ran: batch sizes {seen}"
    assert seen.count(3) == NEW_TOKENS - 1 and seen.count(1) == NEW_TOKENS - 1, seen


# ---- the KV pool: each rank measures its own GPU, the pool is the smallest ---------------------

POOL = PoolParams(fraction=0.9, image_cache=450 * MB, page_bytes=16 * MB, page_size=16,
                  need_tokens=4096, image_tokens=2928)


def run_ranks(fn, world: int = 2) -> list:
    """fn(comm) on `world` gloo ranks (threads, one TCPStore): each rank's result or exception."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    out: list = [None] * world

    def rank(r: int) -> None:
        try:
            comm = TPComm(store if r == 0 else dist.TCPStore("127.0.0.1", store.port, world,
                                                              is_master=False),
                          r, world, torch.device("cpu"), 30.0)
            out[r] = fn(comm)
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[r] = e
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def fake_rank(total: int, weights: int, activations: int):
    """A FakeMemory holding `weights`, and a step that allocates `activations` at its peak and
    meets the other ranks in a collective (as a real dummy step does in its all-reduces)."""
    mem = FakeMemory(total, outside=500 * MB)
    mem.alloc(weights)

    def step(comm, _scratch):
        mem.alloc(activations)
        comm.all_reduce(torch.ones(4))
        mem.free(activations)
    return mem, step


def measure_ranks(budgets: list[tuple[int, int, int]]) -> list:
    def fn(comm):
        mem, step = fake_rank(*budgets[comm.rank])
        run = lambda kv: step(comm, kv)   # noqa: E731
        return measure_and_agree(comm, mem, lambda: None, run, run, POOL)
    return run_ranks(fn, len(budgets))


def alone(rank: int, total: int, weights: int, activations: int) -> int:
    """The pages plan_kv_pool gives this rank's budget by itself."""
    m = Measured(weights, activations, activations, 500 * MB)
    return plan_kv_pool(total=total, fraction=POOL.fraction, measured=m,
                        image_cache=POOL.image_cache if rank == 0 else 0,
                        page_bytes=POOL.page_bytes, page_size=POOL.page_size,
                        need_tokens=POOL.need_tokens, image_tokens=POOL.image_tokens).kv_pages


@pytest.mark.parametrize("budgets", [
    [(80 * GB, 36 * GB, 2 * GB), (80 * GB, 34 * GB, 1 * GB)],    # rank 0 (tower, cache) smallest
    [(80 * GB, 34 * GB, 1 * GB), (48 * GB, 30 * GB, 1 * GB)],    # a worker on a smaller GPU
    [(141 * GB, 36 * GB, 2 * GB), (80 * GB, 34 * GB, 3 * GB)],
], ids=["rank0-smaller", "rank1-smaller", "mixed-gpus"])
def test_ranks_agree_on_the_smallest_pool(budgets):
    plans = measure_ranks(budgets)
    assert not any(isinstance(p, Exception) for p in plans), plans
    own = [alone(r, *b) for r, b in enumerate(budgets)]
    assert len(set(own)) == 2, f"the case must give the ranks different pools: {own}"
    pages = [p.kv_pages for p in plans]
    assert pages == [min(own)] * 2, f"pages per rank {pages}; alone each would fit {own}"
    for r, p in enumerate(plans):   # each rank's plan reports its own measurement
        assert p.weights_bytes == budgets[r][1] and p.total_bytes == budgets[r][0]
        assert p.kv_bytes == min(own) * POOL.page_bytes and p.source.startswith("measured")
        assert p.image_cache_bytes == (POOL.image_cache if r == 0 else 0)  # rank 0's cache only


def test_a_rank_too_small_is_refused_on_every_rank():
    plans = measure_ranks([(80 * GB, 36 * GB, 2 * GB), (40 * GB, 35 * GB, 1 * GB)])
    assert all(isinstance(p, ValueError) for p in plans), plans
    assert all(str(p).startswith("tensor-parallel rank 1: not enough GPU memory") for p in plans)
    assert str(plans[0]) == str(plans[1])


def test_pool_params_round_trip():
    odd = dataclasses.replace(POOL, fraction=0.123456789, page_bytes=(1 << 40) + 3)
    assert PoolParams.from_tensor(odd.to_tensor()) == odd


# ---- GPU: captured graphs with the NCCL collectives inside ------------------------------------

@pytest.mark.gpu
def test_tp2_cuda_graphs_capture_collectives(tiny_next):
    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism on CUDA needs 2 GPUs")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 17, 30)]
    one = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32")
    try:
        assert one.engine.runner.graphs.graphs, "TP=1 captured no graphs"
        want = greedy(one, prompts)
    finally:
        one.close()
    two = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32", tensor_parallel_size=2)
    try:
        graphs = two.engine.runner.graphs
        assert isinstance(graphs, TPDecodeGraphs) and sorted(graphs.graphs) == graphs.buckets
        assert two.engine.runner.memory_plan.source == "measured, smallest of 2 ranks"
        seen = batch_sizes(graphs)
        got = greedy(two, prompts)
    finally:
        two.close()
    assert 3 in seen
    assert got == want, f"TP=2 graph replay differs from TP=1:\n tp2 {got}\n tp1 {want}"


# ---- fp8 KV pages on every rank -----------------------------------------------------------------

@pytest.fixture(scope="module")
def rescaled(tiny_next, tmp_path_factory):
    """The non-degenerate tiny checkpoint of the FP8 accuracy tests."""
    return ck.rescaled(tiny_next, tmp_path_factory.mktemp("tpfp8") / "ckpt")


def test_tp2_fp8_kv_decodes_like_tp1_fp8(rescaled):
    """kv_cache_dtype "fp8" under TP=2: rank 0 tells the worker to hold its KV heads in fp8 pages
    too (OP_SETUP), so the greedy tokens are TP=1 fp8's. The rescaled checkpoint's K/V are large
    enough that fp8 rounding changes its tokens (checked here), so a worker on model-dtype pages
    would not give TP=1 fp8's tokens."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 17, 30, 41)]
    got = {}
    for kv, tp in (("auto", 1), ("fp8", 1), ("fp8", 2)):
        llava = LLaVA.from_pretrained(rescaled, device="cpu", dtype="float32",
                                      tensor_parallel_size=tp,
                                      runtime=RuntimeConfig(kv_cache_dtype=kv))
        try:
            assert llava.engine.runner.kv.k[0].dtype == (
                torch.float8_e4m3fn if kv == "fp8" else torch.float32)
            got[kv, tp] = greedy(llava, prompts)
        finally:
            llava.close()
    assert got["fp8", 1] != got["auto", 1], "fp8 KV changed no token: the check proves nothing"
    assert got["fp8", 2] == got["fp8", 1], \
        f"TP=2 fp8 KV differs from TP=1 fp8 KV:\n tp2 {got['fp8', 2]}\n tp1 {got['fp8', 1]}"


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_measure_header_carries_the_kv_page_dtype(kv_dtype):
    """OP_MEASURE tells the workers rank 0's page dtype (h[3], as OP_SETUP does): a worker's
    scratch KV, part of the peak it measures, is then in fp8 pages when rank 0's is (on CUDA;
    the CPU has no measured pool, so the TP=2 run above never sends OP_MEASURE)."""
    from types import SimpleNamespace

    from fastllava.runtime import tp_step
    from fastllava.runtime.tp_driver import TPDriver

    sent = []

    class Comm:   # records rank 0's first header, then stops the measurement
        def broadcast_header(self, h, idle=False):
            sent.append(h.clone())
            raise ValueError("stop")
    driver = object.__new__(TPDriver)   # no workers: only the message rank 0 would send
    driver.broken, driver.procs, driver.comm, driver._measuring = None, [], Comm(), False
    steps = SimpleNamespace(scratch_pages=7, kv_dtype=kv_dtype, scratch_kv=None, worst_case=None)
    with pytest.raises(ValueError, match="stop"):
        driver.measured_plan(None, steps, None, POOL)
    fp8 = int(kv_dtype == torch.float8_e4m3fn)
    assert torch.equal(sent[0], tp_step.header(tp_step.OP_MEASURE, 7, 0, fp8)), sent
