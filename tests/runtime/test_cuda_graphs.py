"""Decode from padded batch-size buckets (`fastllava.runtime.cuda_graphs`) against the eager path.

CPU: `DecodeGraphs(capture=False)` runs the very code the graphs capture (static buffers, a batch
of B rows padded up to its bucket with KV slot -1 and context length 0) without capturing it. Its
logits and new K/V must match the eager unpadded `ModelRunner` decode of the same sequences (fp32):
- bit for bit when B is a bucket size (same shapes, same kernels);
- within ATOL = 1e-5 when rows are padded: every op is row-wise except attention, which reads only
  each row's own pages, but a CPU GEMM picks its micro-kernels by row count (rows of a partial
  4-row register block go through a tail kernel), so the last rows of B = 3, 5, 6 ... may differ
  from the same rows inside a full bucket in the last ulp (~2e-7 observed), never more.
Padding must never write the cache: every slot that no real row owns is NaN before the step and must
still be NaN after it, and cached slots must not change at all.
The engine's path (`run_batch`: DecodeInputs builds the inputs in place, carried over between
steady steps) must equal the list-built `run` bit for bit at every step of a scripted engine run.

GPU (CUDA + compiled kernels): captured graphs replayed against `RuntimeConfig(cuda_graphs=False)`.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fastllava import LLaVA
from fastllava.kernels.ops import TORCH_OPS, TRITON_OPS
from fastllava.kv_cache import KVCache
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.cuda_graphs import DecodeGraphs, batch_buckets
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.model_runner import ModelRunner
from fastllava.runtime.sequence import SamplingParams, Sequence
from fastllava.runtime.step_io import DeviceBlockTables
from tolerances import FLASH_ATOL, FLASH_FACTOR, describe_mismatch

S = 16             # page size
MAX_PAGES = 8      # block-table width of the static buffers: contexts up to 128 tokens
ATOL = 1e-5        # padded vs unpadded rows, fp32 (see the module docstring)


def test_batch_buckets():
    for max_bs, want in [(1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]),
                         (17, [1, 2, 4, 8, 16, 17]), (64, [1, 2, 4, 8, 16, 32, 48, 64]),
                         (50, [1, 2, 4, 8, 16, 32, 48, 50])]:
        got = batch_buckets(max_bs)
        assert got == want, f"batch_buckets({max_bs}) = {got}, want {want}"
    for max_bs in range(1, 130):      # every batch size has a bucket, padding under 16 rows
        buckets = batch_buckets(max_bs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_bs, buckets
        for B in range(1, max_bs + 1):
            bucket = next(b for b in buckets if b >= B)
            assert bucket - B < 16 and (B > 8 or bucket < 2 * B), (max_bs, B, bucket)


@pytest.fixture(scope="module")
def llava(tiny_next):
    model = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", backend="torch")
    yield model
    model.close()


def make_sequences(B: int, gen: torch.Generator) -> tuple[list[Sequence], int]:
    """B sequences with 1..100 cached tokens (some ending a page, so the new token opens one) on
    shuffled pages; page 0 stays unused, as the padding rows' block tables point at it."""
    lens = torch.randint(1, 100, (B,), generator=gen).tolist()
    lens[: min(B, 3)] = [S, 1, 2 * S - 1][: min(B, 3)]
    need = [-(-(n + 1) // S) for n in lens]
    num_pages = sum(need) + 6
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    seqs = []
    for n, p in zip(lens, need):
        ids = torch.randint(0, 400, (n + 1,), generator=gen).tolist()
        seq = Sequence(ids, SamplingParams(max_tokens=1), max_len=MAX_PAGES * S)
        seq.block_table, order = order[:p], order[p:]
        seqs.append(seq)
    return seqs, num_pages


def fill_cache(kv: KVCache, seqs: list[Sequence], gen: torch.Generator) -> None:
    """NaN everywhere, then random K/V in each sequence's cached slots (its new slot stays NaN)."""
    slots = torch.tensor([seq.block_table[t // S] * S + t % S for seq in seqs
                          for t in range(len(seq) - 1)])
    for cache in kv.k + kv.v:
        flat = cache.view(-1, *cache.shape[2:])
        flat.fill_(float("nan"))
        values = torch.randn(len(slots), *cache.shape[2:], generator=gen)
        flat[slots.to(flat.device)] = values.to(flat.device, flat.dtype)


def new_kv(llava: LLaVA, num_pages: int) -> KVCache:
    t = llava.config.text
    return KVCache(t.num_hidden_layers, num_pages, S, t.num_key_value_heads, t.head_dim,
                   llava.dtype, llava.device)


def eager_and_padded(llava, model, ops, B, max_batch, *, capture: bool, seed: int = 0):
    """One decode step of B random sequences, eager (ModelRunner) and padded (DecodeGraphs) →
    (eager logits (B, V), padded logits (B, V), eager cache, padded cache, the poisoned cache
    both started from, the sequences)."""
    gen = torch.Generator().manual_seed(seed)
    seqs, num_pages = make_sequences(B, gen)
    kv_eager = new_kv(llava, num_pages)
    fill_cache(kv_eager, seqs, gen)
    before = copy.deepcopy(kv_eager)
    kv_padded = copy.deepcopy(kv_eager)
    with torch.inference_mode():      # as in ModelRunner.run
        eager = ModelRunner(model, ops, kv_eager, ImageFeatureCache(0))._decode(seqs)
    graphs = DecodeGraphs(model, ops, kv_padded, max_batch, MAX_PAGES, capture=capture)
    padded = graphs.run([seq.token_ids[-1] for seq in seqs], [len(seq) - 1 for seq in seqs],
                        DeviceBlockTables(llava.device).gather(seqs))
    return eager, padded.clone(), kv_eager, kv_padded, before, seqs


def mismatch(got: torch.Tensor, want: torch.Tensor, exact: bool) -> torch.Tensor:
    """Elements that differ (bitwise, or by more than ATOL); NaN anywhere counts as a mismatch."""
    if exact:
        return (got != want) | got.isnan()
    return ~((got.double() - want.double()).abs() <= ATOL)


def assert_cache_writes(kv: KVCache, want: KVCache, before: KVCache, seqs, exact: bool) -> None:
    """Only the real rows' new slots changed, and they hold `want`'s values."""
    new = torch.zeros(kv.num_pages * S, dtype=torch.bool, device=kv.k[0].device)
    new[[seq.block_table[(len(seq) - 1) // S] * S + (len(seq) - 1) % S for seq in seqs]] = True
    for i, (got, exp, old) in enumerate(zip(kv.k + kv.v, want.k + want.v, before.k + before.v)):
        got, exp, old = (c.view(kv.num_pages * S, -1) for c in (got, exp, old))
        poisoned = old.isnan() & ~new[:, None]
        leaked = poisoned & ~got.isnan()
        assert not leaked.any(), f"cache {i}: padding wrote {int(leaked.sum())} poisoned values; " \
            + describe_mismatch(got, old, leaked)
        bad = mismatch(got[new], exp[new], exact)
        assert not bad.any(), f"cache {i}, new slots: " + describe_mismatch(got[new], exp[new], bad)
        kept = ~old.isnan() & (got != old)
        assert not kept.any(), f"cache {i}: cached slots changed: " + \
            describe_mismatch(got, old, kept)


def check_padded_decode(llava, ops, B: int, max_batch: int) -> None:
    eager, padded, kv_eager, kv_padded, before, seqs = eager_and_padded(
        llava, llava.model, ops, B, max_batch, capture=False, seed=B)
    assert padded.shape == eager.shape == (B, llava.config.text.vocab_size)
    assert not eager.isnan().any(), "the eager decode read a poisoned (unused) slot"
    exact = B in batch_buckets(max_batch) and ops is TORCH_OPS
    bad = mismatch(padded, eager, exact)
    assert not bad.any(), f"B={B} ({'exact' if exact else f'atol {ATOL}'}): padded vs eager " \
        "logits: " + describe_mismatch(padded, eager, bad)
    assert_cache_writes(kv_padded, kv_eager, before, seqs, exact)


@pytest.mark.parametrize("B, max_batch", [(1, 32), (3, 32), (5, 32), (16, 32), (17, 32),
                                          (33, 48)])
def test_padded_decode_matches_eager(llava, B, max_batch):
    check_padded_decode(llava, llava.ops, B, max_batch)


@pytest.mark.interpreter
def test_padded_decode_matches_eager_triton(llava):
    """The Triton KV write must skip slot -1 and paged decode must return zeros (never NaN) for
    context 0. Within ATOL, not exact: the decode kernel's split count depends on B and on the
    block-table width, which differ between the two paths."""
    check_padded_decode(llava, TRITON_OPS, 3, 8)


def test_static_buffers_cover_the_largest_bucket(llava):
    kv = new_kv(llava, 4)
    graphs = DecodeGraphs(llava.model, llava.ops, kv, 24, MAX_PAGES, capture=False)
    assert graphs.buckets == batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert graphs.block_tables.shape == (24, MAX_PAGES) and graphs.input_ids.shape == (24,)
    assert not graphs.graphs, "capture=False must not capture"


class _FakeStream:
    def __init__(self, device=None):
        # torch.cuda.Stream() without a device is made on the current device: here a stand-in
        # for "whichever GPU was current", never the model's
        self.device = torch.device("meta") if device is None else torch.device(device)


class _FakeGraph:
    def pool(self):
        return ("pool", id(self))


def test_capture_runs_on_a_stream_of_the_models_device(llava, monkeypatch):
    """Every graph (decode and sampler, every bucket) is captured on a stream of the KV cache's
    device. torch.cuda.graph's own default capture stream is one per process, made on the device
    current at the first capture: with two engines on two GPUs the second would capture on the
    first's GPU (its torch ops then run eagerly, outside the graph). And in thread_local mode, so
    another engine's thread may sync and allocate meanwhile. CUDA is faked: this checks what each
    capture is handed, on CPU."""
    captures, modes = [], []

    class FakeCapture:
        default_capture_stream = None      # torch.cuda.graph's process-wide default

        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            modes.append(capture_error_mode)
            if stream is None:
                if FakeCapture.default_capture_stream is None:
                    FakeCapture.default_capture_stream = _FakeStream()
                stream = FakeCapture.default_capture_stream
            captures.append(stream)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    kv = new_kv(llava, 4)
    graphs = DecodeGraphs(llava.model, llava.ops, kv, 5, MAX_PAGES, capture=True)
    assert len(captures) == 3 * len(graphs.buckets) == 3 * len(batch_buckets(5)), captures
    devices = {stream.device for stream in captures}
    assert devices == {kv.k[0].device}, \
        f"captured on streams of {devices}, the model is on {kv.k[0].device}"
    # Other threads (another engine serving) stay free to sync and allocate while this captures.
    assert set(modes) == {"thread_local"}, modes


# ---- the engine's graphed decode: inputs built in place against the list-built step -------------

@pytest.mark.parametrize("num_pages", [64, 8])        # 8 pages of 4: preemption
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_run_batch_equals_the_list_built_step(tiny_llava, overlap, num_pages):
    """The engine decodes through DecodeGraphs (capture=False) with DecodeInputs filling the
    static buffers in place (`run_batch`). Before every such step the same step runs through the
    list-built `run` of a second DecodeGraphs over the same KV cache (restored afterwards): the
    static inputs (padding rows included), the logits and the KV writes must be identical, through
    arrivals, stops, cancels, page boundaries (4-token pages) and preemption."""
    from test_overlap import assert_clean, make_engine, requests, run_script

    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32", backend="torch")
    try:
        engine = make_engine(llava, overlap, num_pages=num_pages, graphs=True, capture=False)
        runner, graphs = engine.runner, engine.runner.graphs
        ref = DecodeGraphs(runner.model, runner.ops, runner.kv, graphs.max_batch_size,
                           graphs.block_tables.shape[1], capture=False)
        steps, packs, errors = [], [], []
        pack = runner._decode_inputs._pack
        runner._decode_inputs._pack = lambda *a: packs.append(1) or pack(*a)
        run_batch = graphs.run_batch

        def checked(seqs, inputs, tables):
            try:
                return check(seqs, inputs, tables)
            except AssertionError as e:     # the engine would fail the step's requests: keep it
                errors.append(e)
                raise

        def check(seqs, inputs, tables):
            caches = runner.kv.k + runner.kv.v
            saved = [c.clone() for c in caches]
            host_ids = [seq.token_ids[-1] for seq in seqs]
            ids = runner._future.resolve(torch.tensor(host_ids), host_ids).tolist()
            want = ref.run(ids, [len(seq) - 1 for seq in seqs], tables).clone()
            want_kv = [c.clone() for c in caches]
            for c, old in zip(caches, saved):
                c.copy_(old)
            got = run_batch(seqs, inputs, tables)
            bs = graphs.bucket(len(seqs))
            for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
                g, r = getattr(graphs, name)[:bs], getattr(ref, name)[:bs]
                assert torch.equal(g, r), f"step {len(steps)} {name}: {g.tolist()} != {r.tolist()}"
            bad = mismatch(got, want, exact=True)
            assert not bad.any(), f"step {len(steps)}: " + describe_mismatch(got, want, bad)
            for i, (c, w) in enumerate(zip(caches, want_kv)):
                assert torch.equal(c.nan_to_num(7.0), w.nan_to_num(7.0)), f"cache {i}"
            steps.append(len(seqs))
            return got
        graphs.run_batch = checked
        reqs = requests(10)            # odd ones sample with a seed, some with top_p
        for r in reqs:                 # long enough for runs of steady decode steps
            r["params"]["max_tokens"] += 8
        arrive, cancel = {0: [0, 1], 1: [2], 2: [3, 4], 5: [5], 6: [6, 7], 9: [8, 9]}, {4: [1]}
        run_script(engine, reqs, arrive, cancel)
        assert not errors, errors[0]
        assert_clean(engine)
        assert max(steps) > 1 and len(steps) > 12, steps
        # Steady steps carry over (no pack); arrivals, finishes and preemption pack.
        assert 3 <= len(packs) <= len(steps) - 5, (len(packs), steps)
        if num_pages == 8:
            assert sum(m.num_preemptions for m in engine.test_metrics) > 0, "nothing preempted"
    finally:
        llava.close()


# ---- GPU: captured graphs ------------------------------------------------------------------------

GPU_RUNTIME = dict(kv_cache_tokens=16384, max_num_seqs=16, max_context=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_logits_match_eager(tiny_next, dtype):
    """One decode step, B = 5 in bucket 8: the replayed graph against the eager Triton decode,
    both judged against a float64 torch-ops copy of the same weights (FlashAttention's rule)."""
    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype=dtype,
                                  runtime=RuntimeConfig(**GPU_RUNTIME))
    try:
        assert llava.ops.name == "triton" and llava.engine.runner.graphs is not None
        eager, graph, kv_eager, kv_graph, before, seqs = eager_and_padded(
            llava, llava.model, llava.ops, 5, 8, capture=True, seed=5)
        ref_model = copy.deepcopy(llava.model).double()
        kv_ref = KVCache(len(before.k), before.num_pages, S, *before.k[0].shape[2:],
                         torch.float64, "cuda")
        for dst, src in zip(kv_ref.k + kv_ref.v, before.k + before.v):
            dst.copy_(src.double())
        with torch.inference_mode():
            ref = ModelRunner(ref_model, TORCH_OPS, kv_ref, ImageFeatureCache(0))._decode(seqs)
        err_eager = (eager.double() - ref.double()).abs().max().item()
        err_graph = (graph.double() - ref.double()).abs().max().item()
        bound = FLASH_FACTOR * err_eager + FLASH_ATOL[dtype]
        assert err_graph <= bound, f"{dtype}: graph error {err_graph:.3e} vs eager " \
            f"{err_eager:.3e} (bound {bound:.3e}) against the float64 reference"
        nan = (kv_graph.k[0].isnan() & ~before.k[0].isnan()).sum().item()
        assert nan == 0, f"{nan} real slots are NaN after the replay"
        poisoned = before.k[0].isnan().sum().item() - kv_graph.k[0].isnan().sum().item()
        assert poisoned == len(seqs) * kv_graph.k[0][0, 0].numel(), \
            f"the replay wrote {poisoned} poisoned values, expected only the 5 new tokens' K"
    finally:
        llava.close()


@pytest.mark.gpu
def test_graph_replay_greedy_tokens_equal_eager(tiny_next, tmp_path):
    """16 concurrent greedy requests, fp32: the same tokens with and without CUDA graphs (bf16 is
    held to the logits bound above: its rounding may flip a near-tie between batch shapes)."""
    import numpy as np
    from PIL import Image

    images = []
    for i, (h, w) in enumerate([(48, 64), (64, 40), (30, 90), (56, 56)]):
        images.append(str(tmp_path / f"img{i}.png"))
        rng = np.random.RandomState(300 + i)
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    reqs = [{"image_url": images[i % 4], "prompt": f"Describe {i} " + "red " * (i % 5),
             "temperature": 0, "max_tokens": 4 + (7 * i) % 24} for i in range(16)]
    results = {}
    for graphs_on in (True, False):
        llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="float32",
                                      runtime=RuntimeConfig(cuda_graphs=graphs_on, **GPU_RUNTIME))
        try:
            runner = llava.engine.runner
            assert (runner.graphs is not None) == graphs_on
            replays = []
            if graphs_on:
                run = runner.graphs.run_batch
                runner.graphs.run_batch = lambda *a: replays.append(len(a[0])) or run(*a)
            out = [None] * len(reqs)
            barrier = threading.Barrier(len(reqs))

            def worker(i):
                barrier.wait()
                out[i] = llava.generate_ids(reqs[i])
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert None not in out, "a request never returned"
            assert not graphs_on or max(replays, default=0) > 1, \
                f"the decode steps never replayed a multi-row graph: {replays}"
            assert llava.stats()["kv_pages_used"] == 0
            results[graphs_on] = out
        finally:
            llava.close()
    bad = [i for i in range(len(reqs)) if results[True][i] != results[False][i]]
    assert not bad, f"{len(bad)} of 16 requests differ with graphs (first {bad[0]}): " \
        f"{results[True][bad[0]]} vs eager {results[False][bad[0]]}"
