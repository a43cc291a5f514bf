"""Sampling inside the decode graphs (`DecodeGraphs.sample`) against eager decode + `sample()`.

CPU: `DecodeGraphs(capture=False)` runs the very code the graphs capture: the decode step's greedy
argmax, and `sample()` over the whole bucket reading the static parameter buffers. Its ids must be
- bit for bit `sample(logits, params)` on the logits the same step returned (the sampler's rows
  are independent, so the bucket's extra rows change nothing), for greedy, sampled, top-p and
  mixed batches, at B = 1 and padded B = 3 → 4, 5 → 8, 17 → 32, with large seeds and steps;
- the ids of the eager unpadded decode + `sample()`: bit for bit when B is a bucket size (the logits
  are then identical); else wherever the race is not a near-tie (padded logits differ from eager
  ones in the last ulp on CPU, see test_cuda_graphs.py): at least 80% of the rows must be clear
  of a near-tie for the comparison to count;
- unchanged when the padding rows carry garbage parameters (NaN / inf / negative temperature,
  top_p outside (0, 1], negative seeds and steps) and garbage logits; sampling never writes the KV
  cache or the parameter buffers' padding rows;
- the same when a reused SamplingBatch (steps advanced in place) copies only its steps.
Through ModelRunner.launch (one step, with logprobs rows reading the graph's logits) and the
engine (serial and overlapped loops, arrivals and a cancel): the same ids / events with the graph
path as without it.

GPU (CUDA + compiled kernels): the same comparisons against captured graphs, replayed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastllava import LLaVA
from fastllava.kv_cache import KVCache
from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.cuda_graphs import DecodeGraphs, batch_buckets
from fastllava.runtime.engine import Engine
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.model_runner import ModelRunner
from fastllava.runtime.sampler import SamplingBatch, race_scores, sample
from fastllava.runtime.scheduler import Batch, Scheduler, SchedulerConfig
from fastllava.runtime.sequence import SamplingParams
from fastllava.runtime.step_io import DeviceBlockTables
from test_cuda_graphs import ATOL, MAX_PAGES, fill_cache, make_sequences, new_kv
from test_overlap import requests, run_script, tokens

KINDS = ["greedy", "sampled", "top_p", "mixed"]


@pytest.fixture(scope="module")
def llava(tiny_next):
    model = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", backend="torch")
    yield model
    model.close()


def make_params(kind: str, B: int, device, seed: int = 0) -> SamplingBatch:
    """B rows of `kind`: all greedy; all sampled with top_p 1; all top-p; or greedy, sampled and
    top-p rows interleaved. Seeds and steps span the 64-bit range the sampler accepts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(B):
        kind_i = kind if kind != "mixed" else ("greedy", "sampled", "top_p")[i % 3]
        temperature = 0.0 if kind_i == "greedy" else 0.5 + torch.rand((), generator=g).item()
        top_p = 0.3 + 0.6 * torch.rand((), generator=g).item() if kind_i == "top_p" else 1.0
        rows.append((temperature, top_p, (2**62 + 977 * i) if i % 2 else i, (2**33 + i) * (i % 3)))
    return SamplingBatch.build(rows, device)


def decode_step(llava, B: int, max_batch: int, *, capture: bool, seed: int):
    """One decode step of B random sequences, eager (ModelRunner) and through DecodeGraphs →
    (eager logits (B, V), the graphs after run(), their logits (B, V), the graphs' KV cache)."""
    gen = torch.Generator().manual_seed(seed)
    seqs, num_pages = make_sequences(B, gen)
    kv_eager = new_kv(llava, num_pages)
    fill_cache(kv_eager, seqs, gen)
    kv_graph = copy.deepcopy(kv_eager)
    with torch.inference_mode():
        eager = ModelRunner(llava.model, llava.ops, kv_eager, ImageFeatureCache(0))._decode(seqs)
    graphs = DecodeGraphs(llava.model, llava.ops, kv_graph, max_batch, MAX_PAGES, capture=capture)
    logits = graphs.run([seq.token_ids[-1] for seq in seqs], [len(seq) - 1 for seq in seqs],
                        DeviceBlockTables(llava.device).gather(seqs))
    return eager, graphs, logits, kv_graph


def race_margin(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """(B,) gap between the best and second-best score of each row's race (its logits for greedy
    rows), in units of logits: how far the logits may move before the winner can change."""
    scores = torch.where((params.temperature == 0)[:, None], logits, race_scores(logits, params))
    top2 = scores.topk(2, dim=-1).values
    scale = torch.where(params.temperature == 0, 1.0, params.temperature)
    return (top2[:, 0] - top2[:, 1]) * scale


def assert_same_ids(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, f"{what}: {len(bad)} of {got.numel()} rows differ, first row {bad[0]}: " \
        f"{got[bad[0]].item()} vs {want[bad[0]].item()}"


def check_graph_sampling(llava, B: int, max_batch: int, kind: str, *, capture: bool) -> None:
    eager, graphs, logits, kv = decode_step(llava, B, max_batch, capture=capture, seed=B)
    params = make_params(kind, B, llava.device, seed=B)
    kv_before = copy.deepcopy(kv)
    got = graphs.sample(params)
    assert got.shape == (B,) and got.dtype == torch.int64
    assert_same_ids(got, sample(logits, params), f"B={B} {kind}: graph vs sample() on its logits")
    for k, k0 in zip(kv.k + kv.v, kv_before.k + kv_before.v):
        assert torch.equal(k.nan_to_num(7.0), k0.nan_to_num(7.0)), "sampling wrote the KV cache"
    want = sample(eager, params)
    if B in batch_buckets(max_batch) and not capture:
        assert_same_ids(got, want, f"B={B} {kind}: graph vs eager decode + sample()")
        return
    # Logits that moved by at most diff cannot change a winner ahead by more than 2 x diff.
    diff = (logits - eager).abs().max().item()
    assert diff <= ATOL or capture, f"B={B}: padded logits {diff:.3e} from eager"
    clear = race_margin(eager, params) > 2 * diff
    assert clear.float().mean() >= 0.8, f"B={B} {kind}: too many near-ties to compare"
    assert_same_ids(got[clear], want[clear], f"B={B} {kind}: graph vs eager decode + sample()")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B", [1, 3, 5, 17])
def test_graph_sampling_matches_eager(llava, B, kind):
    check_graph_sampling(llava, B, 32, kind, capture=False)


GARBAGE_T = [float("nan"), float("inf"), -1.0, 0.0, 1e-30, 3.0e38, -0.0]
GARBAGE_P = [float("nan"), 0.0, -3.0, 2.0, float("inf"), 1e-40, 0.5]


def poison_padding(graphs: DecodeGraphs, B: int, bs: int) -> None:
    """Garbage in the padding rows of every sampler input: the parameter buffers and the
    bucket's logits (the view `run` returned ends at B; the bucket's tensor is the last run's)."""
    n = bs - B
    with torch.inference_mode():     # the bucket's logits are an inference tensor
        graphs.temperature[B:bs] = torch.tensor((GARBAGE_T * bs)[:n])
        graphs.top_p[B:bs] = torch.tensor((GARBAGE_P * bs)[:n])
        graphs.seeds[B:bs] = torch.tensor(([-1, 2**63 - 1, -(2**63), 5] * bs)[:n])
        graphs.steps[B:bs] = -7
        logits = graphs._last[2]
        assert logits.shape[0] == bs
        garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38])
        logits[B:] = garbage[torch.arange(n) % 4][:, None]


@pytest.mark.parametrize("B, bucket", [(5, 8), (17, 32)])
def test_padding_rows_with_garbage_do_not_change_real_rows(llava, B, bucket):
    for kind in ("sampled", "top_p", "mixed"):
        _, graphs, logits, _ = decode_step(llava, B, 32, capture=False, seed=B)
        params = make_params(kind, B, llava.device, seed=B + 1)
        clean = graphs.sample(params).clone()
        poison_padding(graphs, B, bucket)
        got = graphs.sample(params)
        assert graphs.temperature[B].isnan(), "the padding parameters were rewritten: untested"
        assert_same_ids(got, clean, f"B={B} {kind}: garbage padding vs clean")
        assert_same_ids(got, sample(logits, params), f"B={B} {kind}: vs sample()")


def test_a_reused_batch_copies_only_its_steps_and_a_new_one_everything(llava):
    """SamplingBatches hands the same batch object to consecutive steps with its steps advanced
    in place: the graphs then copy only the steps. Each step's ids must still be sample()'s on
    that step's logits, and a new batch (other temperatures, seeds) must replace every field."""
    _, graphs, _, _ = decode_step(llava, 5, 8, capture=False, seed=3)
    reused = make_params("mixed", 5, llava.device, seed=1)
    logits = graphs._last[2][:5]
    for step in range(3):
        assert_same_ids(graphs.sample(reused), sample(logits, reused), f"reused, step {step}")
        reused.steps.add_(1)
    for seed in (7, 8):
        other = make_params("top_p", 5, llava.device, seed=seed)
        assert_same_ids(graphs.sample(other), sample(logits, other), f"new batch {seed}")
    assert_same_ids(graphs.sample(reused), sample(logits, reused), "the first batch again")


def test_sample_refuses_a_mismatched_batch(llava):
    _, graphs, _, _ = decode_step(llava, 3, 8, capture=False, seed=0)
    with pytest.raises(ValueError, match="rows"):
        graphs.sample(make_params("sampled", 4, llava.device))
    fresh = DecodeGraphs(llava.model, llava.ops, new_kv(llava, 4), 8, MAX_PAGES, capture=False)
    with pytest.raises(RuntimeError, match="run"):
        fresh.sample(make_params("greedy", 1, llava.device))


# ---- through the runner and the engine: ModelRunner.launch samples inside the graphs -------------

@pytest.mark.parametrize("kind", ["greedy", "mixed"])
def test_runner_launch_samples_in_the_graphs_with_logprobs(llava, kind):
    """One decode step of 4 rows (a bucket: identical logits) launched with and without graphs:
    the same ids, and rows asking for logprobs read the same values from the graph's logits."""
    results = []
    for graphed in (False, True):
        gen = torch.Generator().manual_seed(11)
        seqs, num_pages = make_sequences(4, gen)
        kv = new_kv(llava, num_pages)
        fill_cache(kv, seqs, gen)
        for i, seq in enumerate(seqs):
            sampled = kind == "mixed" and i % 2 == 1
            seq.params = SamplingParams(max_tokens=4, temperature=0.8 if sampled else 0.0,
                                        top_p=0.7 if i == 3 else 1.0, seed=1000 + i,
                                        logprobs=3 if i in (1, 2) else None)
        graphs = DecodeGraphs(llava.model, llava.ops, kv, 8, MAX_PAGES, capture=False) \
            if graphed else None
        runner = ModelRunner(llava.model, llava.ops, kv, ImageFeatureCache(0), graphs,
                             max_num_seqs=8)
        calls = []
        if graphed:
            sample_in_graphs = graphs.sample
            graphs.sample = lambda p: calls.append(p.all_greedy) or sample_in_graphs(p)
        batch = Batch(seqs, [1] * 4, [len(seq) - 1 for seq in seqs], True, [True] * 4)
        results.append((runner.launch(batch).tokens(), [seq.logprobs for seq in seqs]))
        assert calls == ([kind == "greedy"] if graphed else []), calls
    assert results[1] == results[0], f"graphs {results[1]} vs eager {results[0]}"
    assert results[0][1][1] and results[0][1][2] and not results[0][1][0], results[0][1]


S, MAX_LEN = 4, 32     # as in test_overlap.py


def make_engine(llava, overlap: bool, graphs: bool, *, capture: bool = False) -> Engine:
    t, runner = llava.config.text, llava.engine.runner
    kv = KVCache(t.num_hidden_layers, 64, S, t.num_key_value_heads, t.head_dim, llava.dtype,
                 llava.device)
    decode = DecodeGraphs(runner.model, runner.ops, kv, 8, MAX_LEN // S, capture=capture) \
        if graphs else None
    model_runner = ModelRunner(runner.model, runner.ops, kv, ImageFeatureCache(0), decode,
                               max_num_seqs=8)
    return Engine(Scheduler(SchedulerConfig(8, 64, 16), BlockManager(64, S)), model_runner,
                  overlap=overlap)


def check_engine(llava, *, capture: bool) -> None:
    reqs = requests(10)            # odd requests sample with a seed, some with top_p
    arrive, cancel = {0: [0, 1], 1: [2], 2: [3, 4], 5: [5], 6: [6, 7], 9: [8, 9]}, {4: [1]}
    want = run_script(make_engine(llava, False, graphs=False), reqs, arrive, cancel)
    for overlap in (False, True):
        engine = make_engine(llava, overlap, graphs=True, capture=capture)
        graphs, calls = engine.runner.graphs, []
        sample_in_graphs = graphs.sample
        graphs.sample = lambda p: calls.append(p.all_greedy) or sample_in_graphs(p)
        got = run_script(engine, reqs, arrive, cancel)
        assert False in calls and True in calls, f"no sampled and greedy graph steps: {calls}"
        for i in range(len(reqs)):
            if i == 1:   # cancelled: the loops cancel at different tokens
                assert tokens(got[i]) == tokens(want[i])[:len(tokens(got[i]))], (i, got[i])
            else:
                assert got[i] == want[i], f"overlap={overlap} request {i}: {got[i]} != {want[i]}"


def test_engine_samples_inside_the_graphs(tiny_llava):
    """Greedy and seeded (top-p) requests arriving and leaving mid-flight: the engine with the
    graph path (capture=False on CPU) gives the events of the engine without it."""
    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32", backend="torch")
    try:
        check_engine(llava, capture=False)
    finally:
        llava.close()


# ---- GPU: captured graphs ------------------------------------------------------------------------

GPU_RUNTIME = dict(kv_cache_tokens=16384, max_num_seqs=16, max_context=1024)


@pytest.mark.gpu
def test_replayed_sampling_matches_eager(tiny_next):
    """Captured decode + sampler graphs (Triton kernels, fp32): replayed ids equal sample() on
    the replayed logits bit for bit and eager decode + sample() away from near-ties; garbage in
    the padding rows changes nothing; the engine's events equal the eager engine's."""
    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32",
                                  runtime=RuntimeConfig(**GPU_RUNTIME))
    try:
        assert llava.ops.name == "triton"
        for B, kind in [(1, "greedy"), (1, "top_p"), (5, "sampled"), (5, "top_p"),
                        (5, "mixed"), (8, "mixed"), (3, "greedy")]:
            check_graph_sampling(llava, B, 8, kind, capture=True)
        _, graphs, logits, _ = decode_step(llava, 5, 8, capture=True, seed=5)
        assert graphs.sampler_graphs, "nothing captured"
        params = make_params("mixed", 5, llava.device, seed=6)
        clean = graphs.sample(params).clone()
        with torch.inference_mode():
            graphs.temperature[5:8] = torch.tensor(GARBAGE_T[:3], device="cuda")
            graphs.top_p[5:8] = torch.tensor(GARBAGE_P[:3], device="cuda")
            graphs.outputs[8][0][5:] = float("nan")
        assert_same_ids(graphs.sample(params), clean, "garbage padding vs clean (replayed)")
    finally:
        llava.close()
    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32",
                                  runtime=RuntimeConfig(cuda_graphs=False, **GPU_RUNTIME))
    try:
        check_engine(llava, capture=True)
    finally:
        llava.close()


@pytest.mark.gpu
def test_memory_plan_counts_the_sampler_graphs(tiny_next):
    """The graph-pool term covers the largest sampler graph: at least the top-p sampler's own
    peak at max_num_seqs rows beside their logits (a decode forward alone holds far less)."""
    from fastllava.runtime.build import memory_plan
    from fastllava.runtime.dummy_step import DummySteps

    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32",
                                  runtime=RuntimeConfig(**GPU_RUNTIME))
    try:
        rc = RuntimeConfig(max_num_seqs=16, max_context=1024)     # measured, not kv_cache_tokens
        steps = DummySteps(llava.model, llava.ops, rc, torch.float32, llava.device)
        with torch.inference_mode():
            plan = memory_plan(steps, llava.config.text, rc, graphs=True)
            logits = torch.randn(16, llava.config.text.vocab_size, device="cuda")
            params = make_params("top_p", 16, llava.device)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            sample(logits, params)
            sampler_peak = torch.cuda.max_memory_allocated() - base
        need = sampler_peak + logits.numel() * 4
        assert plan.graph_pool_bytes >= need, \
            f"graph pool {plan.graph_pool_bytes} B < sampler peak + logits {need} B"
    finally:
        llava.close()
