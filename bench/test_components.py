"""Component benchmarks under pytest-benchmark (bench/conftest.py): each Triton kernel, image
preprocessing, the vision tower, a prefill, and a decode step of the runtime at batch 1 / 8
(tiny: 1 / 3), on random weights at the real shapes (`--bench-config`) on a GPU, a tiny random
model on a CPU.
The kernel table (ceilings, SDPA peers) is `fastllava bench kernels`; these track regressions
between commits (`--benchmark-autosave`, `--benchmark-compare`)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava.benchmarks.kernel_table import KERNELS
from fastllava.benchmarks.engines import RandomEngine

PROMPT_TOKENS = 600     # ≈ a LLaVA-1.5 prompt with its 576 image tokens (tiny: 24)
DECODE_ROOM = 512       # decode steps a sequence can take across warm-up + rounds


@pytest.fixture(scope="module")
def engine(request, tiny, device):
    config = None if tiny else request.config.getoption("--bench-config")
    eng = RandomEngine(config, device=device, max_len=PROMPT_TOKENS + DECODE_ROOM, max_seqs=8)
    yield eng
    del eng


@pytest.mark.parametrize("size", ["1024x768", "4000x3000"])
def test_preprocess(measure, device, tiny, size):
    from fastllava.preprocess.processor import (CLIP_MEAN, CLIP_STD, NEXT_PINPOINTS,
                                                ImageProcessorConfig, preprocess)

    w, h = {"1024x768": (64, 48), "4000x3000": (101, 37)}[size] if tiny else map(int, size.split("x"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    cfg = ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, pinpoints=NEXT_PINPOINTS)
    out = measure(lambda: preprocess(img, cfg, device=device))
    assert out.pixel_values.shape[1:] == (3, 336, 336)


def test_vision_tower(measure, engine):
    """The tower + projector on 5 tiles (a LLaVA-NeXT image: base + 2x2 grid)."""
    s = engine.config.vision.image_size
    pixels = torch.randn(5, 3, s, s, device=engine.device, dtype=engine.dtype)
    ops = engine.engine.runner.ops
    with torch.inference_mode():
        feats = measure(lambda: engine.model.multi_modal_projector(
            ops, engine.model.vision_tower(ops, pixels)))
    assert feats.shape[0] == 5 and torch.isfinite(feats).all()


def test_prefill(measure, engine, tiny):
    """One request's prefill and first token (TTFT without the image work)."""
    n = 24 if tiny else PROMPT_TOKENS
    rng = random.Random(0)
    traces = measure(lambda: engine.run(engine.prompts(rng, 1, n), 1))
    assert traces[0].tokens == 1 and not traces[0].error


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step(measure, engine, tiny, batch):
    """One decode step of `batch` sequences: schedule → run (graph replay on CUDA) → update."""
    from fastllava.runtime.sequence import SamplingParams, Sequence

    B, n = (3 if tiny and batch > 1 else batch), (24 if tiny else PROMPT_TOKENS)
    sched, runner = engine.engine.scheduler, engine.engine.runner
    params = SamplingParams(max_tokens=DECODE_ROOM - 8, temperature=0.0, stop_ids=())
    rng = random.Random(B)
    seqs = [Sequence(p, params, engine.max_len) for p in engine.prompts(rng, B, n)]
    for seq in seqs:
        sched.add(seq)

    def step(decode: bool = True):
        batch_ = sched.schedule()
        assert not decode or (batch_.is_decode and len(batch_.seqs) == B), batch_
        assert not sched.update(batch_, runner.run(batch_)), "a sequence finished early"
    try:
        while any(s.num_generated == 0 for s in seqs):
            step(decode=False)
        measure(step)
    finally:
        for seq in seqs:
            sched.abort(seq)
            runner.release(seq)
    assert sched.bm.num_used_pages == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel(measure, tiny, device, kernel):
    """Each launcher (Triton, or the torch op it calls) at the first shape of its `fastllava bench kernels` rows (real shapes
    on a GPU; tiny ones, interpreted, on a CPU). Inputs stay in L2 between rounds here: the
    cold-L2 roofline figures are `bench kernels`'; this tracks regressions between commits.
    Correctness is the kernel tests' job (tests/kernels/)."""
    from fastllava.benchmarks.common import REAL, SMOKE
    from fastllava.benchmarks.kernel_table import BUILDERS  # (kernels imported lazily by it)

    gen = torch.Generator(device=device).manual_seed(0)
    case = next(iter(BUILDERS[kernel](SMOKE if tiny else REAL, gen)))
    run = next(iter(case.impls.values()))     # the launcher comes first (Case's contract)
    measure(lambda: run(*case.args, **case.kwargs), rounds=1 if device == "cpu" else None)
