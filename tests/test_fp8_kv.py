"""kv_cache_dtype="fp8": the knob (RuntimeConfig, from_pretrained, run/serve flags), the memory
plan (twice the pages in the same bytes), the engine's cache, and the refusals. Accuracy is
tests/test_fp8_kv_accuracy.py's; the kernels are tests/kernels/test_kv_quant.py's and
test_fp8_kv_attention.py's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastllava import LLaVA, cli
from fastllava.kv_cache import KVCache
from fastllava.runtime import build
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.dummy_step import DummySteps
from fastllava.runtime.memory_plan import GB, Measured

FP8 = torch.float8_e4m3fn


def test_runtime_config_names_the_field():
    assert RuntimeConfig().kv_cache_dtype == "auto"
    assert RuntimeConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    for bad in ("fp16", "float8_e4m3fn", "", None):
        with pytest.raises(ValueError, match="RuntimeConfig.kv_cache_dtype must be one of"):
            RuntimeConfig(kv_cache_dtype=bad)


@pytest.mark.parametrize("command", [["serve", "--model", "m"],
                                     ["run", "--model", "m", "--image", "x", "--prompt", "p"]])
def test_flag_maps_onto_the_runtime_config(command):
    parser = cli.build_parser()
    args = parser.parse_args(command + ["--kv-cache-dtype", "fp8"])
    assert cli.runtime_from_args(args).kv_cache_dtype == "fp8"
    assert cli.runtime_from_args(parser.parse_args(command)).kv_cache_dtype == "auto"
    if command[0] == "serve":
        assert cli.settings_from_args(args).runtime.kv_cache_dtype == "fp8"


def test_bad_flag_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["serve", "--model", "m", "--kv-cache-dtype", "int8"])
    assert exit_.value.code == 2
    assert "--kv-cache-dtype: invalid choice: 'int8'" in capsys.readouterr().err


def test_fp8_page_is_half_a_bf16_page():
    shape = dict(num_layers=60, page_size=16, num_kv_heads=8, head_dim=128)   # 34B
    bf16 = KVCache.bytes_per_page(**shape, dtype=torch.bfloat16)
    assert bf16 == 16 * 245760 and KVCache.bytes_per_page(**shape, dtype=FP8) * 2 == bf16


class FakeCuda:
    """What build.memory_plan reads from CudaMemory on a measured (CUDA) plan."""

    def __init__(self, device):
        pass

    def total(self):
        return 80 * GB


def test_measured_plan_gives_twice_the_pages(tiny_next, monkeypatch):
    """The CUDA plan (measured peaks faked: the 34B-on-H100 figures of test_memory_plan) sizes
    the pool in the pages' own dtype: fp8 holds twice the bf16 pages in the same bytes."""
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", backend="torch",
                                  runtime=RuntimeConfig(max_context=256))
    try:
        measured = Measured(int(0.5 * GB), int(1.6 * GB), int(0.2 * GB), int(0.5 * GB))
        monkeypatch.setattr(build, "CudaMemory", FakeCuda)
        monkeypatch.setattr(build, "measure", lambda *a: measured)
        plans = {}
        for kv in ("auto", "fp8"):
            rc = RuntimeConfig(kv_cache_dtype=kv, image_cache_rows=0, cuda_graphs=False)
            steps = DummySteps(llava.model, llava.ops, rc, torch.bfloat16, "cuda")
            plans[kv] = build.memory_plan(steps, llava.config.text, rc, graphs=False)
        fp8, auto = plans["fp8"], plans["auto"]
        assert fp8.kv_pages in (2 * auto.kv_pages, 2 * auto.kv_pages + 1)   # + a half page left
        assert fp8.kv_bytes - auto.kv_bytes < auto.kv_bytes / auto.kv_pages / 2 + 1
    finally:
        llava.close()


def test_engine_cache_is_fp8_and_generates(tiny_next):
    """A CPU engine with kv_cache_dtype='fp8' (via from_pretrained's shorthand) holds fp8 pages,
    its memory plan counts them at 1 byte, and it generates."""
    runtime = RuntimeConfig(kv_cache_tokens=1024)
    loaded = {kv: LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32",
                                        runtime=runtime, kv_cache_dtype=kv)
              for kv in ("auto", "fp8")}
    try:
        kv = loaded["fp8"].engine.runner.kv
        assert kv.k[0].dtype == FP8 and kv.v[-1].dtype == FP8 and kv.k_scale[0] == 1.0
        assert loaded["fp8"].runtime.kv_cache_dtype == "fp8"
        plans = {k: m.stats()["memory_plan"] for k, m in loaded.items()}
        assert plans["fp8"]["kv_pages"] == plans["auto"]["kv_pages"] == 1024 // 16
        bytes_ = {k: m.engine.runner.memory_plan.kv_bytes for k, m in loaded.items()}
        assert bytes_["fp8"] * 4 == bytes_["auto"]   # fp32 model: 4 bytes → 1
        out = loaded["fp8"].generate({"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert isinstance(out["output"], str)
    finally:
        for m in loaded.values():
            m.close()


def test_contradicting_settings_are_refused(tiny_next):
    with pytest.raises(ValueError, match="contradicts runtime.kv_cache_dtype 'fp8'"):
        LLaVA.from_pretrained(tiny_next, device="cpu", runtime=RuntimeConfig(kv_cache_dtype="fp8"),
                              kv_cache_dtype="auto")
    with pytest.raises(ValueError, match="RuntimeConfig.kv_cache_dtype must be one of"):
        LLaVA.from_pretrained(tiny_next, device="cpu", kv_cache_dtype="e5m2")


def test_triton_on_a_gpu_without_fp8_is_refused(monkeypatch):
    """Compiled Triton has float8e4nv from sm_89 on: an A100 (8.0) is told what to use instead."""
    from fastllava.kernels.ops import TRITON_OPS, TORCH_OPS

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="compute capability >= 8.9.*A100 is 8.0.*backend 'torch'"):
        build.check_kv_cache_dtype("fp8", TRITON_OPS, cuda)
    build.check_kv_cache_dtype("fp8", TORCH_OPS, cuda)       # torch casts fp8 on any GPU
    build.check_kv_cache_dtype("auto", TRITON_OPS, cuda)
    build.check_kv_cache_dtype("fp8", dataclasses.replace(TRITON_OPS), torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_engine_with_fp8_kv_matches_its_torch_path(tiny_next, tmp_path):
    """On an FP8 GPU: the compiled Triton path (CUDA graphs, fp8 pages) against the torch path
    over the same fp8 pages, bf16, on the non-degenerate (rescaled) tiny checkpoint (logits
    spread wide enough that attention rounding does not flip a pick): the same greedy tokens."""
    import fp8_checkpoint as ck

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an FP8 GPU (sm_89+)")
    path = ck.rescaled(tiny_next, tmp_path / "ckpt")
    req = {"prompt": "what is in this image", "max_tokens": 8, "temperature": 0}
    ids = []
    for backend in ("triton", "torch"):
        m = LLaVA.from_pretrained(path, device="cuda", dtype="bfloat16", backend=backend,
                                  kv_cache_dtype="fp8")
        try:
            assert m.engine.runner.kv.k[0].dtype == FP8
            assert (m.engine.runner.graphs is not None) == (backend == "triton")
            ids.append(m.generate_ids(req))
        finally:
            m.close()
    assert ids[0] == ids[1]
