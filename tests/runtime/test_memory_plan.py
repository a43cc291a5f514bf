"""The KV pool is what gpu_memory_fraction leaves beside a measured worst-case step.

CPU: the arithmetic (memory_plan.plan_kv_pool) and the measurement protocol (memory_plan.measure)
against a fake allocator; the dummy steps and the warm-up through a tiny real model; what stats()
reports; what the vision tower keeps alive. The CUDA provider itself runs in the gpu tests.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from fastllava import LLaVA
from fastllava.models.vision_tower import VisionTower
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime import dummy_step
from fastllava.runtime.cuda_graphs import batch_buckets
from fastllava.runtime.dummy_step import DummySteps, image_shapes, warm_up
from fastllava.runtime.memory_plan import GB, Measured, measure, plan_kv_pool

MB = 1 << 20


class FakeMemory:
    """A caching allocator in miniature: freed blocks stay cached until empty_cache()."""

    def __init__(self, total: int, outside: int = 0):
        self._total, self._outside = total, outside
        self.live, self.cached, self.max_live = 0, 0, 0
        self.log: list[str] = []

    def alloc(self, n: int) -> None:
        reuse = min(self.cached, n)
        self.cached -= reuse
        self.live += n
        self.max_live = max(self.max_live, self.live)

    def free(self, n: int) -> None:
        self.live -= n
        self.cached += n

    def empty_cache(self):
        self.log.append("empty_cache")
        self.cached = 0

    def reset_peak(self):
        self.log.append("reset_peak")
        self.max_live = self.live

    def allocated(self):
        self.log.append("allocated")
        return self.live

    def peak(self):
        return self.max_live

    def total(self):
        return self._total

    def outside_torch(self):
        return self._outside


def test_measure_reads_weights_and_step_peaks_on_an_emptied_allocator():
    mem = FakeMemory(80 * GB, outside=600 * MB)
    mem.alloc(30 * GB)                          # weights
    mem.alloc(900 * MB), mem.free(900 * MB)     # a loader temporary, left cached
    scratch = 512 * MB

    class Scratch:                              # freed when measure() drops it
        def __init__(self):
            mem.alloc(scratch)

        def __del__(self):
            mem.free(scratch)

    make_scratch = Scratch

    def prefill(_):                             # 3 GB of activations at its peak, 1 GB at the end
        mem.alloc(2 * GB), mem.alloc(1 * GB), mem.free(2 * GB), mem.free(1 * GB)

    def decode(_):
        mem.alloc(300 * MB), mem.free(300 * MB)

    m = measure(mem, make_scratch, prefill, decode)
    assert mem.log[:2] == ["empty_cache", "allocated"], mem.log
    assert m == Measured(weights=30 * GB, activations=3 * GB, graph_pool=300 * MB,
                         outside_torch=600 * MB)
    assert mem.live == 30 * GB and mem.cached == 0, "scratch or step memory left behind"
    assert measure(mem, make_scratch, prefill, None).graph_pool == 0


CASES = [  # total, fraction, weights, activations, graph pool, image cache, outside, page bytes
    (80 * GB, 0.90, 68.8e9, 1.6 * GB, 0.2 * GB, 0.45 * GB, 0.5 * GB, 16 * 0.25 * MB),  # 34B, H100
    (141 * GB, 0.95, 26e9, 0.9 * GB, 0.3 * GB, 0.3 * GB, 0.6 * GB, 16 * 0.82 * MB),   # 13B, H200
    (24 * GB, 1.0, 14e9, 2 * GB, 0, 0, 0.4 * GB, 16 * 0.5 * MB),
    (80 * GB, 0.5, 1e9, 10 * GB, 1 * GB, 0, 0, 64 * 0.82 * MB),
]


@pytest.mark.parametrize("total,fraction,weights,act,pool,images,outside,page_bytes", CASES)
def test_kv_pool_fills_the_fraction_to_the_page(total, fraction, weights, act, pool, images,
                                                outside, page_bytes):
    m = Measured(int(weights), int(act), int(pool), int(outside))
    page_bytes, S = int(page_bytes), 16
    plan = plan_kv_pool(total=total, fraction=fraction, measured=m, image_cache=int(images),
                        page_bytes=page_bytes, page_size=S, need_tokens=4096, image_tokens=2928)
    held = m.weights + m.activations + m.graph_pool + int(images) + m.outside_torch
    budget = total * fraction
    # Whole pages, as many as fit: the leftover below the budget is less than one page.
    assert plan.kv_bytes == plan.kv_pages * page_bytes and plan.kv_tokens == plan.kv_pages * S
    assert 0 <= budget - held - plan.kv_bytes < page_bytes + 1
    assert plan.max_image_requests == plan.kv_tokens // 2928
    d = plan.as_dict()
    assert d["weights_gb"] == round(m.weights / GB, 3)
    assert d["kv_gb"] == round(plan.kv_bytes / GB, 3)
    assert d["source"] == "measured" and d["kv_tokens"] == plan.kv_tokens
    summary = plan.summary()
    for figure in (d["weights_gb"], d["activations_gb"], plan.kv_tokens, plan.max_image_requests):
        assert str(figure) in summary, summary


def test_34b_on_h100_gets_what_the_measured_peak_leaves():
    """The issue's case: 34B on an 80 GiB H100 at 0.9 (72 GiB) got ~3.8 GB of KV from the
    guessed reserve. By hand: 72 - 64.07 (68.8e9 weights) - 1.6 - 0.2 - 0.45 - 0.5 = 5.17 GiB,
    / 240 KiB per token = ~22.6k tokens, 7 requests of 2,928 image tokens."""
    m = Measured(int(68.8e9), int(1.6 * GB), int(0.2 * GB), int(0.5 * GB))
    plan = plan_kv_pool(total=80 * GB, fraction=0.9, measured=m, image_cache=int(0.45 * GB),
                        page_bytes=16 * 245760, page_size=16, need_tokens=4096, image_tokens=2928)
    assert 5.16 * GB < plan.kv_bytes <= 5.18 * GB, plan.kv_bytes / GB
    assert plan.kv_tokens == plan.kv_bytes // 245760
    assert plan.max_image_requests == 7


@pytest.mark.parametrize("weights,act", [(70 * GB, 1 * GB), (85 * GB, 0), (71.99 * GB, 0)])
def test_refuses_when_no_request_fits(weights, act):
    m = Measured(int(weights), int(act), 0, 0)
    with pytest.raises(ValueError) as err:
        plan_kv_pool(total=80 * GB, fraction=0.9, measured=m, image_cache=0,
                     page_bytes=16 * MB, page_size=16, need_tokens=8192, image_tokens=576)
    msg = str(err.value)
    for part in ("not enough GPU memory for the KV cache", "8192-token request needs 512",
                 "gpu_memory_fraction 0.9", f"weights take {weights / GB:.2f} GB"):
        assert part in msg, msg


def test_exactly_one_request_fits():
    m = Measured(70 * GB, 0, 0, 0)
    plan = plan_kv_pool(total=72 * GB + 512 * 16 * MB, fraction=1.0, measured=m, image_cache=0,
                        page_bytes=16 * MB, page_size=16, need_tokens=8192 - 5, image_tokens=576)
    assert plan.kv_pages == 512 + 2 * GB // (16 * MB)


# ---- through a tiny model on CPU -----------------------------------------------------------------

def load(path, **runtime) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", backend="torch",
                                 runtime=RuntimeConfig(**runtime))


def test_cpu_pool_is_unchanged_and_reported(tiny_next):
    llava = load(tiny_next, max_context=300, page_size=16)
    try:
        plan = llava.stats()["memory_plan"]
        assert plan["source"] == "max_context" and plan["kv_pages"] == -(-300 // 16)
        assert llava.stats()["kv_pages_total"] == plan["kv_pages"]
        weights = sum(p.numel() * p.element_size() for p in llava.model.parameters())
        assert plan["weights_gb"] >= round(weights / GB, 3)
        assert plan["max_image_requests"] == plan["kv_tokens"] // max(
            s[3] for s in image_shapes(llava.config))
    finally:
        llava.close()
    llava = load(tiny_next, max_context=300, kv_cache_tokens=1000)
    try:
        plan = llava.stats()["memory_plan"]
        assert plan["source"] == "kv_cache_tokens" and plan["kv_pages"] == -(-1000 // 16)
    finally:
        llava.close()


@pytest.fixture(scope="module")
def next_model(tiny_next):
    llava = load(tiny_next)
    yield llava
    llava.close()


def test_image_shapes_match_what_the_tower_packs(next_model):
    """Every tile count anyres can produce, with the token count the model really packs."""
    shapes = image_shapes(next_model.config)
    pinpoints = next_model.config.pinpoints
    tile = next_model.config.vision.image_size
    assert [s[0] for s in shapes] == sorted({1 + (h // tile) * (w // tile) for h, w in pinpoints})
    steps = DummySteps(next_model.model, next_model.ops, RuntimeConfig(), torch.float32, "cpu")
    for tiles, grid, hw, tokens in shapes:
        assert steps.images(tiles, grid, hw).shape == (tokens, next_model.config.text.hidden_size)


def test_dummy_steps_and_warm_up_run_every_path(next_model):
    """The worst-case step and the warm-up (run on CUDA only) drive the real model through the
    tower at every tile count, prefill with and without a prefix, decode and both samplers."""
    rc = RuntimeConfig(max_num_seqs=3, max_num_batched_tokens=700, max_context=1024)
    steps = DummySteps(next_model.model, next_model.ops, rc, torch.float32, "cpu")
    kv = steps.scratch_kv()
    calls = {"prefill": [], "decode": [], "images": [], "sample": []}
    for name in calls:
        real = getattr(steps, name)

        def spy(*a, real=real, name=name, **kw):
            out = real(*a, **kw)
            calls[name].append((a[1:] if name != "images" else a, kw))
            assert torch.isfinite(out.float()).all(), name
            return out
        setattr(steps, name, spy)
    steps.worst_case(kv)
    assert calls["images"][0][0][0] == image_shapes(next_model.config)[-1][0]
    assert calls["prefill"][0][0] == (700, 3)
    steps.decode_and_sample(kv)    # the graph pool's step: the largest decode + top-p sampler
    assert calls["decode"][-1][0] == (3,) and calls["sample"][-1][1] == {"greedy": False}
    assert held_while_sampling(steps, kv) == kept_bytes(3, next_model.config.text.vocab_size)
    warm_up(steps, kv, [1, 3])
    assert len(calls["images"]) == 1 + len(image_shapes(next_model.config))
    prefixes = {kw.get("prefix", 0) for _, kw in calls["prefill"]}
    assert 0 in prefixes and max(prefixes) > 0
    assert {a[0] for a, _ in calls["decode"]} == {1, 3}
    assert {kw["greedy"] for _, kw in calls["sample"]} == {True, False}


def kept_bytes(max_num_seqs: int, vocab: int) -> int:
    """What the captured graphs of every bucket below the largest keep: fp32 logits + 3 id rows."""
    return sum(bs * (vocab * 4 + 3 * 8) for bs in batch_buckets(max_num_seqs)[:-1])


def held_while_sampling(steps, kv) -> int:
    """Bytes of the kept-outputs stand-ins still alive while decode_and_sample's sampler runs."""
    made, held = [], []
    make, real = dummy_step.kept_graph_outputs, steps.sample

    def probed(*a):
        out = make(*a)
        made.extend(weakref.ref(t) for t in out)
        return out

    def spy(logits, **kw):
        held.append(sum(t.numel() * t.element_size() for t in (r() for r in made) if t is not None))
        return real(logits, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "sample", spy)
        mp.setattr(dummy_step, "kept_graph_outputs", probed)
        steps.decode_and_sample(kv)
    assert made and all(r() is None for r in made), "the stand-ins outlived the step"
    return held[0]


def test_kept_graph_outputs_match_what_the_graphs_keep():
    """The stand-ins are what DecodeGraphs keeps per smaller bucket (its `outputs` and `sampled`);
    at 256 rows and a 64k vocabulary that is ~0.5 GB the largest bucket's measurement misses."""
    for B in (1, 3, 16, 64):
        got = dummy_step.kept_graph_outputs(B, 100, "cpu")
        assert sum(t.numel() * t.element_size() for t in got) == kept_bytes(B, 100)
    assert 0.45 < kept_bytes(256, 64064) / 2**30 < 0.5


@pytest.mark.parametrize("layers", [(-2,), (0, 2, -1)])
def test_vision_tower_keeps_only_the_selected_hidden_states(next_model, layers):
    """While layer i runs, no earlier hidden state (0 = the embeddings) is alive unless selected."""
    config = next_model.config
    config = dataclasses.replace(config, vision_feature_layers=layers,
                                 vision=dataclasses.replace(config.vision, num_hidden_layers=5))
    tower = VisionTower(config).eval()
    selected = set(tower.selected)
    states: list[weakref.ref] = []
    leaks = []

    def hook(layer, args, out):
        gc.collect()
        i = len(states)                                    # this is hidden state i
        for j, ref in enumerate(states[:-1]):              # states[-1] is this layer's input
            if ref() is not None and j not in selected:
                leaks.append((i, j))
        states.append(weakref.ref(out))

    handles = [tower.layers[0].register_forward_pre_hook(
        lambda layer, args: states.append(weakref.ref(args[1])))]
    handles += [layer.register_forward_hook(hook) for layer in tower.layers]
    try:
        side = config.vision.image_size
        with torch.inference_mode():
            tower(next_model.ops, torch.randn(2, 3, side, side))
    finally:
        for h in handles:
            h.remove()
    assert len(states) == len(tower.layers) + 1 >= 5
    assert not leaks, f"(state being made, earlier state still alive): {leaks}"


def test_dummy_positions_stay_below_what_a_request_reaches(next_model, monkeypatch):
    """A full step longer than max_context is spread over more sequences: no position past it
    (a rotary table by position would be read out of bounds)."""
    rc = RuntimeConfig(max_num_seqs=1, max_num_batched_tokens=200, max_context=64)
    steps = DummySteps(next_model.model, next_model.ops, rc, torch.float32, "cpu")
    seen = []
    forward = type(next_model.model).forward

    def spy(self, ops, embeds, ctx, kv):
        seen.append(ctx)
        return forward(self, ops, embeds, ctx, kv)
    monkeypatch.setattr(type(next_model.model), "__call__", spy)
    kv = steps.scratch_kv()
    steps.worst_case(kv)
    warm_up(steps, kv, [1])
    assert seen and max(int(c.positions.max()) for c in seen) < 64
    assert max(int(c.cu_seqlens[-1]) for c in seen) == 200      # the full step still ran
