"""Backend selection: which op table a model gets, and the errors for impossible choices."""

from __future__ import annotations

import dataclasses

import pytest

from fastllava.kernels import ops


def test_auto_picks_compiled_triton_on_cuda_and_torch_ops_elsewhere(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.get_ops("auto", "cuda") is ops.TRITON_OPS
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.get_ops("auto", "cuda") is ops.TORCH_OPS
    assert ops.get_ops("auto", "cpu") is ops.TORCH_OPS
    assert ops.get_ops("torch", "cuda") is ops.TORCH_OPS
    assert ops.get_ops("reference", "cpu") is ops.REFERENCE_OPS


@pytest.mark.interpreter
def test_triton_on_cpu_runs_under_the_interpreter():
    assert ops.interpreted(), "kernels/__init__ must turn the interpreter on without CUDA"
    assert ops.get_ops("triton", "cpu") is ops.TRITON_OPS


def test_impossible_choices_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.get_ops("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="built for the CPU interpreter"):
        ops.get_ops("triton", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs the Triton interpreter"):
        ops.get_ops("triton", "cpu")


def test_every_reference_has_a_triton_launcher_with_its_signature():
    import inspect
    for field in dataclasses.fields(ops.Ops):
        if field.name == "name":
            continue
        ref = getattr(ops.REFERENCE_OPS, field.name)
        kernel, fast = getattr(ops.TRITON_OPS, field.name), getattr(ops.TORCH_OPS, field.name)
        assert kernel is not ref and ref.__name__ == kernel.__name__ + "_ref"
        ref_params = list(inspect.signature(ref).parameters)
        assert list(inspect.signature(kernel).parameters)[:len(ref_params)] == ref_params
        assert list(inspect.signature(fast).parameters) == ref_params, field.name


def test_torch_backend_attention_is_fused_sdpa():
    """The CPU default must not fall back to the per-sequence eager references."""
    for name in ("prefill_attention", "paged_decode_attention"):
        fast, ref = getattr(ops.TORCH_OPS, name), getattr(ops.REFERENCE_OPS, name)
        assert fast is not ref and fast.__name__ == name + "_sdpa"
