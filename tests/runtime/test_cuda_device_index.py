"""A model on a CUDA device other than the current one (cuda:1 from a thread on cuda:0).

Triton launches, CUDA-graph capture and a new thread's default all use the *current* device,
not the tensors': the build runs under `torch.cuda.device(model's)`, the engine thread sets its
own, and the step's ids are read through an event recorded on their device's stream. Needs two
GPUs; the same requests on cuda:0 and cuda:1 must give the same tokens (fp32, greedy and seeded),
with CUDA graphs and the Triton kernels as `auto` picks them, and leave the caller's current
device alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava import LLaVA


@pytest.mark.gpu
def test_second_gpu_gives_the_first_gpus_tokens(tiny_next, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)
    requests = [{"image_url": str(image), "prompt": "Describe.", "temperature": 0, "max_tokens": 12},
                {"image_url": str(image), "prompt": "What is it?", "temperature": 0.7, "top_p": 0.9,
                 "seed": 5, "max_tokens": 12}]
    torch.cuda.set_device(0)
    outputs = {}
    for device in ("cuda:0", "cuda:1"):
        llava = LLaVA.from_pretrained(tiny_next, device=device, dtype="float32")
        try:
            assert torch.cuda.current_device() == 0, "the build changed the caller's device"
            outputs[device] = [llava.generate(r)["output"] for r in requests]
            assert llava.stats()["kv_pages_used"] == 0
        finally:
            llava.close()
    assert outputs["cuda:1"] == outputs["cuda:0"], outputs


def test_unindexed_cuda_resolves_to_the_callers_current_gpu(monkeypatch):
    """device "cuda" (or None on a CUDA machine) is the caller's current GPU, pinned by index:
    left unindexed, each thread would read it as its own current device (a server thread's is
    cuda:0: images preprocessed on another GPU than the model's) and tensor-parallel workers
    would count their GPUs from 0 (rank 1 on the model's own cuda:1). CUDA is faked."""
    from fastllava.pretrained import _resolve_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for asked in (None, "cuda", torch.device("cuda")):
        device, dtype = _resolve_device_dtype(asked, None)
        assert device == torch.device("cuda", 1), (asked, device)
        assert dtype == torch.bfloat16
    assert _resolve_device_dtype("cuda:0", None)[0] == torch.device("cuda", 0)
    assert _resolve_device_dtype("cpu", None)[0] == torch.device("cpu")
