"""Shared fixtures: tiny random checkpoints (built once per test session) and tolerances."""

from __future__ import annotations

import pytest
import torch

import tiny


def pytest_collection_modifyitems(config, items):
    """gpu tests need CUDA and compiled kernels; interpreter tests run Triton kernels on CPU
    tensors, which needs TRITON_INTERPRET (set automatically without CUDA; on a GPU machine run
    them with TRITON_INTERPRET=1, and the gpu tests without it)."""
    from fastllava.kernels.common import interpreted

    has_cuda, interp = torch.cuda.is_available(), interpreted()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")
    skip_interp = pytest.mark.skip(reason="runs Triton kernels on CPU: needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords:
            if not has_cuda or interp:
                item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not interp:
            item.add_marker(skip_interp)


@pytest.fixture
def bench_script():
    """bench_script(name): a bench/ script imported in-process (bench/ is a folder of scripts, not
    a package); unimported again afterwards, with every bench/ module it pulled in (`common`,
    decode.py's `decode_plan`, ...)."""
    import importlib
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(folder))
    yield importlib.import_module
    sys.path.remove(str(folder))
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == folder:
            del sys.modules[name]


def _build(tmp_path_factory, name: str, spec: tiny.Spec, **kwargs):
    return tiny.build(spec, tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory):
    """LLaVA-NeXT (anyres), CLIP tower, GQA 4/2, vicuna template, sharded hf5 layout."""
    return _build(tmp_path_factory, "next", tiny.Spec(kind="next", num_kv_heads=2))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """LLaVA-1.5, CLIP tower, MHA, vicuna template, single-file safetensors."""
    return _build(tmp_path_factory, "llava", tiny.Spec(kind="llava", num_kv_heads=4, seed=1),
                  max_shard_size=None)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    """LLaVA-1.5 style with a SigLIP tower (head_dim 12, no CLS), chatml template."""
    return _build(tmp_path_factory, "siglip",
                  tiny.Spec(kind="llava", vision="siglip", template="chatml", seed=2))


@pytest.fixture(scope="session")
def tiny_chatml_next(tmp_path_factory):
    """LLaVA-NeXT with a chatml template and eos list (the v1.6-34b shape of things)."""
    return _build(tmp_path_factory, "chatml_next",
                  tiny.Spec(kind="next", template="chatml", num_kv_heads=1, rope_theta=5e6, seed=3))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tests made of many small torch ops (the preprocessing sweeps) run ~3x faster without
    OpenMP threads on a shared 2-core machine; the thread count is restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
