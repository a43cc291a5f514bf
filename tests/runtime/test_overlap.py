"""The overlapped engine loop (RuntimeConfig.overlap_scheduling) against the serial one.

The engine is driven step by step on the test thread from a script (which requests arrive and
which are cancelled before which step), so "mid-flight" is exact: an arrival or a cancel lands
while a step is launched and its ids are still unread. The real tiny LLaVA decoder (fp32, torch
ops) runs every step, so placeholders really go through the device ring and the device block
tables. Every request must get exactly the tokens it gets alone on the serial loop (greedy and
seeded sampling, stop ids taken from those reference outputs so that stops land mid-batch and the
one-step lag is exercised); a cancelled request gets a prefix of them; afterwards no page, block-
table row or request is left.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastllava import LLaVA
from fastllava.kv_cache import KVCache
from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.cuda_graphs import DecodeGraphs
from fastllava.runtime.engine import Engine, RequestHandle
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.model_runner import ModelRunner, leading_decode_rows
from fastllava.runtime.scheduler import Scheduler, SchedulerConfig
from fastllava.runtime.sequence import SamplingParams, Sequence

S = 4          # small pages: sequences cross page boundaries every few tokens
MAX_LEN = 32   # 8 pages: an 8-page pool holds one request, not all


@pytest.fixture(scope="module")
def parts(tiny_llava):
    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32", backend="torch")
    yield llava
    llava.close()


def make_engine(llava, overlap: bool, num_pages: int = 64, max_num_seqs: int = 8,
                graphs: bool = False, capture: bool = True) -> Engine:
    """graphs: decode through DecodeGraphs (captured, or run eagerly with capture=False)."""
    t, model, ops = llava.config.text, llava.engine.runner.model, llava.engine.runner.ops
    kv = KVCache(t.num_hidden_layers, num_pages, S, t.num_key_value_heads, t.head_dim,
                 torch.float32, llava.device)
    captured = DecodeGraphs(model, ops, kv, max_num_seqs, MAX_LEN // S, capture=capture) \
        if graphs else None
    runner = ModelRunner(model, ops, kv, ImageFeatureCache(0), captured,
                         max_num_seqs=max_num_seqs)
    sched = Scheduler(SchedulerConfig(max_num_seqs, 64, 16), BlockManager(num_pages, S))
    return Engine(sched, runner, overlap=overlap)


def requests(n: int, stops: dict[int, tuple[int, ...]] | None = None) -> list[dict]:
    """n prompts of varied lengths; odd ones sample with a seed (top_p on some)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids = torch.randint(3, 200, (3 + (5 * i) % 11,), generator=g).tolist()
        kw = dict(max_tokens=4 + (3 * i) % 9)
        if i % 2:
            kw.update(temperature=0.9, top_p=0.8 if i % 4 == 1 else 1.0, seed=100 + i)
        out.append(dict(ids=ids, params=kw, stops=(stops or {}).get(i, ())))
    return out


def run_script(engine: Engine, reqs: list[dict], arrive: dict[int, list[int]],
               cancel: dict[int, list[int]] = {}, max_steps: int = 500) -> dict[int, list]:
    """Drive the loop: before step k, add the requests arrive[k] and cancel those in cancel[k].
    Returns each request's events."""
    events: dict[int, list] = {i: [] for i in range(len(reqs))}
    handles: dict[int, RequestHandle] = {}
    for k in range(max_steps):
        for i in arrive.get(k, []):
            r = reqs[i]
            seq = Sequence(r["ids"], SamplingParams(**r["params"], stop_ids=r["stops"]), MAX_LEN)
            handles[i] = RequestHandle(seq, lambda kind, v, i=i: events[i].append((kind, v)))
            engine._add(handles[i])
        for i in cancel.get(k, []):
            engine._cancel(handles[i])
        if engine.overlap:
            engine._overlapped_step()
        elif engine.scheduler:
            engine._step()
        if k > max(arrive) and not engine.scheduler and engine._in_flight is None:
            break
    assert not engine.scheduler and engine._in_flight is None, "the script did not finish"
    engine.test_metrics = [h.seq.metrics for h in handles.values()]
    return events


def tokens(evs: list) -> list[int]:
    return [v for kind, v in evs if kind == "token"]


def assert_clean(engine: Engine) -> None:
    bm = engine.scheduler.bm
    assert bm.num_used_pages == 0 and not engine._handles, (bm.num_used_pages, engine._handles)
    assert not engine.runner.block_tables._row, engine.runner.block_tables._row


def alone(llava, reqs) -> list[list]:
    """Each request by itself on the serial loop: the reference events."""
    return [run_script(make_engine(llava, overlap=False), [r], {0: [0]})[0] for r in reqs]


@pytest.fixture(scope="module")
def scripted(parts):
    """(requests, their alone-on-the-serial-loop events)."""
    base = alone(parts, requests(10))
    # Stop ids picked from the reference outputs (the 2nd token of some requests): stops then
    # land mid-batch, one step before the overlapped loop learns of them.
    stops = {i: (tokens(base[i])[1],) for i in (0, 3, 4, 7) if len(tokens(base[i])) > 2}
    reqs = requests(10, stops)
    return reqs, alone(parts, reqs)


@pytest.mark.parametrize("num_pages", [64, 8])        # 8 pages of 4: preemption under overlap
def test_overlap_equals_serial_with_arrivals_stops_and_cancels(parts, scripted, num_pages):
    reqs, ref = scripted
    arrive = {0: [0, 1], 1: [2], 2: [3, 4], 5: [5], 6: [6, 7], 9: [8, 9]}
    cancel = {4: [1], 8: [6]}
    for overlap in (False, True):
        engine = make_engine(parts, overlap, num_pages=num_pages)
        got = run_script(engine, reqs, arrive, cancel)
        for i in range(len(reqs)):
            if any(i in c for c in cancel.values()):
                assert got[i][-1] == ("finish", "cancelled"), (overlap, i, got[i])
                want = tokens(ref[i])
                assert tokens(got[i]) == want[:len(tokens(got[i]))], (overlap, i, got[i], want)
            else:
                assert got[i] == ref[i], f"overlap={overlap} request {i}: {got[i]} != {ref[i]}"
        assert_clean(engine)
        if num_pages == 8:
            assert sum(s.num_preemptions for s in engine.test_metrics) > 0, "nothing preempted"
    assert any(("finish", "stop") in evs for evs in ref), "no stop landed: the lag is untested"


def test_overlap_keeps_one_step_in_flight(parts):
    """The overlapped loop really launches step N+1 before reading step N's ids: while a request
    decodes, each call launches one step and finishes the previous one."""
    engine = make_engine(parts, overlap=True)
    reqs = requests(1)
    reqs[0]["params"]["max_tokens"] = 6
    launched, read = [], []
    launch, finish = engine.runner.launch, engine._finish_step
    engine.runner.launch = lambda b: launched.append(len(read)) or launch(b)
    engine._finish_step = lambda *a: read.append(len(launched)) or finish(*a)
    events = run_script(engine, reqs, {0: [0]})
    # step k's ids are read only after step k+1 was launched (until nothing is left to launch)
    assert read[:5] == [2, 3, 4, 5, 6], (launched, read)
    assert len(tokens(events[0])) == 6 and events[0][-1] == ("finish", "length"), events
    assert_clean(engine)


def test_runtime_config_switch(parts):
    assert parts.engine.overlap is parts.runtime.overlap_scheduling is True


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_overlap_equals_serial_on_cuda(tiny_llava, graphs):
    """On CUDA the overlap is real (pinned inputs, non_blocking copies, the ids read through an
    event): the scripted run still gives the serial loop's events, with and without graphs."""
    llava = LLaVA.from_pretrained(tiny_llava, device="cuda", dtype="float32")
    try:
        base = [run_script(make_engine(llava, False, graphs=graphs), [r], {0: [0]})[0]
                for r in requests(10)]
        stops = {i: (tokens(base[i])[1],) for i in (0, 3, 4, 7) if len(tokens(base[i])) > 2}
        reqs = requests(10, stops)
        arrive, cancel = {0: [0, 1], 1: [2], 2: [3, 4], 5: [5], 6: [6, 7], 9: [8, 9]}, {4: [1]}
        serial = run_script(make_engine(llava, False, graphs=graphs), reqs, arrive, cancel)
        for num_pages in (64, 8):
            engine = make_engine(llava, True, num_pages=num_pages, graphs=graphs)
            got = run_script(engine, reqs, arrive, cancel)
            for i in range(len(reqs)):
                if i == 1:      # cancelled: a prefix (the two loops cancel at different tokens)
                    assert tokens(got[i]) == tokens(serial[i])[:len(tokens(got[i]))], got[i]
                elif num_pages == 64:
                    assert got[i] == serial[i], (i, got[i], serial[i])
                # 8 pages: preempted requests are recomputed by the prefill kernels, whose
                # rounding may flip a near-tie on CUDA; there only completion and no leaks count.
            assert_clean(engine)
    finally:
        llava.close()


def test_leading_decode_rows():
    assert leading_decode_rows([0, 1, 2, 15, 16], [5, 7, 0, 3]) == 2     # then a 13-token chunk
    assert leading_decode_rows([0, 1, 2], [4, 9]) == 2                   # decodes only
    assert leading_decode_rows([0, 1, 5], [0, 9]) == 0                   # a fresh 1-token prompt
    assert leading_decode_rows([0, 4, 5], [3, 9]) == 0                   # a chunk first
    assert leading_decode_rows([0], []) == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_steps_mark_their_decode_rows(parts, overlap):
    """Requests arriving while others decode make mixed steps: the decoder's attention gets
    decode_rows = the leading 1-token rows over a cached prefix (the riders the Triton backend
    runs through the decode kernel), read from the step's own cu_seqlens / prefix_lens."""
    engine = make_engine(parts, overlap)
    runner = engine.runner
    seen = []

    def recording(q, k, v, cu, *, decode_rows=0, **kw):
        if kw.get("prefix_lens") is not None:
            bounds, prefixes = cu.tolist(), kw["prefix_lens"].tolist()
            lens = [b - a for a, b in zip(bounds, bounds[1:])]
            want = next((i for i, (n, p) in enumerate(zip(lens, prefixes)) if n != 1 or p == 0),
                        len(lens))
            seen.append((decode_rows, want))
        return attention(q, k, v, cu, decode_rows=decode_rows, **kw)

    attention = runner.ops.prefill_attention
    runner.ops = dataclasses.replace(runner.ops, prefill_attention=recording)
    reqs = requests(6)
    run_script(engine, reqs, {0: [0], 2: [1, 2], 4: [3], 5: [4, 5]})
    assert seen and all(got == want for got, want in seen), seen
    assert any(got > 0 for got, _ in seen), "no mixed step: the riders went untested"
    assert_clean(engine)
