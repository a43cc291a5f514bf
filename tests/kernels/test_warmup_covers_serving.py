"""The engine's warm-up launches every kernel variant that serving then launches (CPU proof).

The interpreter compiles nothing, so the variants are told apart by their specialization keys
(specialization.py, Triton's own binder for a Hopper target): the keys a mixed workload launches
through the real engine must all have been launched by `warm_up` before. On a GPU
tests/runtime/test_warmup_gpu.py counts real compilations instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from concurrency import run_threads
from PIL import Image
from specialization import recording

from fastllava import LLaVA
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.dummy_step import DummySteps, warm_up

pytestmark = pytest.mark.interpreter

SIZES = [(48, 64), (90, 30), (200, 200), (30, 120)]   # several anyres grids of the tiny model


def test_warm_up_covers_a_mixed_workload(tiny_next, tmp_path):
    images = []
    for i, (h, w) in enumerate(SIZES):
        images.append(str(tmp_path / f"img{i}.png"))
        rng = np.random.RandomState(i)
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    rc = RuntimeConfig(max_num_seqs=3, max_num_batched_tokens=96, max_context=512,
                       max_prefill_tokens_while_decoding=24, page_size=16)
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", backend="triton",
                                  runtime=rc)
    warm, served = set(), set()
    try:
        steps = DummySteps(llava.model, llava.ops, rc, torch.float32, "cpu")
        with recording(warm), torch.inference_mode():
            warm_up(steps, llava.engine.runner.kv, [1, rc.max_num_seqs])  # CPU: no graphs

        def request(i):
            return llava.generate({
                "image_url": images[i % len(images)], "prompt": "describe " * (1 + 29 * i % 60),
                "temperature": 0 if i % 2 else 0.8, "top_p": 0.9, "seed": i,
                "max_tokens": 2 + 5 * i % 9})
        with recording(served):
            run_threads([lambda i=i: request(i) for i in range(5)])
            request(0)                                       # a prefix-cache hit
    finally:
        llava.close()
    names = {k.split("(")[0] for k in served}
    assert {"_prefill_attention_kernel", "_decode_split_kernel", "_rms_norm_kernel"} <= names
    missing = served - warm
    assert not missing, f"{len(missing)} variants served but never warmed: {sorted(missing)[:3]}"
