"""After the engine is built (the server's "ready"), no Triton kernel compiles, whatever comes.

The warm-up (runtime/dummy_step.warm_up) runs every variant a step can meet and the kernels do
not specialize on per-step ints (tests/kernels/test_specialization.py). Here a mixed workload
runs through the real engine on the GPU while Triton's jit_cache_hook, called before every
kernel-cache miss, records what would compile: it must record nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import triton
from concurrency import run_threads
from PIL import Image

from fastllava import LLaVA
from fastllava.runtime.config import RuntimeConfig

SIZES = [(48, 64), (64, 40), (90, 30), (200, 200), (30, 120), (56, 56), (300, 100)]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_mixed_workload_compiles_nothing_after_build(tiny_next, tmp_path, cuda_graphs):
    images = []
    for i, (h, w) in enumerate(SIZES):     # every anyres grid the tiny pinpoints allow
        images.append(str(tmp_path / f"img{i}.png"))
        rng = np.random.RandomState(i)
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    rc = RuntimeConfig(max_num_seqs=6, max_num_batched_tokens=160, max_context=1024,
                       max_prefill_tokens_while_decoding=48, cuda_graphs=cuda_graphs)
    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="bfloat16", backend="triton",
                                  runtime=rc)
    compiled = []

    def record(*, repr, **_):
        compiled.append(repr)

    previous, triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_cache_hook, record
    try:
        def request(i):
            return llava.generate({
                "image_url": images[i % len(images)],
                "prompt": "describe " * (1 + 37 * i % 200),   # short to chunked prompts
                "temperature": 0 if i % 2 else 0.8, "top_p": 0.9, "seed": i,
                "max_tokens": 3 + 11 * i % 40})
        run_threads([lambda i=i: request(i) for i in range(20)])
        run_threads([lambda i=i: request(i) for i in range(3)])   # prefix-cache hits
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
        llava.close()
    assert not compiled, f"{len(compiled)} kernels compiled after ready: {compiled[:5]}"


@pytest.mark.gpu
def test_measured_plan_holds_the_served_peak(tiny_next, tmp_path):
    """The pool the plan sizes plus what serving then allocates stays within the fraction."""
    import torch

    path = str(tmp_path / "img.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 100, 3), dtype=np.uint8)
                    ).save(path)
    rc = RuntimeConfig(max_num_seqs=4, max_num_batched_tokens=256, max_context=1024,
                       gpu_memory_fraction=0.25)
    torch.cuda.empty_cache()
    llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="bfloat16", backend="triton",
                                  runtime=rc)
    try:
        plan = llava.stats()["memory_plan"]
        assert plan["source"] == "measured" and plan["activations_gb"] > 0, plan
        total = torch.cuda.mem_get_info()[1]
        assert abs(plan["total_gb"] * (1 << 30) - total) < 1 << 21
        torch.cuda.reset_peak_memory_stats()
        run_threads([lambda i=i: llava.generate({
            "image_url": path, "prompt": "describe " * (5 + 50 * i), "max_tokens": 8})
            for i in range(6)])
        used = torch.cuda.max_memory_reserved() + plan["outside_torch_gb"] * (1 << 30)
        assert used <= total * rc.gpu_memory_fraction, (used / (1 << 30), plan)
    finally:
        llava.close()
