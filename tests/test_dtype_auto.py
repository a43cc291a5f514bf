"""dtype="auto": bf16 where the device multiplies bf16 natively (CUDA; CPUs with AMX-BF16 or
AVX512-BF16), fp32 on other CPUs; dtype=None stays the public contract (fp32 on CPU)."""

import pytest
import torch

from fastllava import pretrained
from fastllava.pretrained import _resolve_device_dtype, cpu_has_native_bf16

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbugs\t\t: spectre_v1\n"


@pytest.mark.parametrize("extra,native", [
    ("avx512f avx512bw", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16 amx_int8", True),
    ("amx_tile amx_int8", False), ("", False)])
def test_cpu_flags(tmp_path, extra, native):
    info = tmp_path / "cpuinfo"
    info.write_text(FLAGS.format(extra=extra))
    assert cpu_has_native_bf16(str(info)) is native


def test_unreadable_cpuinfo_is_not_native(tmp_path):
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_the_flags(monkeypatch, native, expected):
    monkeypatch.setattr(pretrained, "cpu_has_native_bf16", lambda: native)
    assert _resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), expected)
    # None is the public contract: fp32 on the CPU whatever the CPU can do.
    assert _resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)


def test_bad_dtype_names_auto(monkeypatch):
    with pytest.raises(ValueError, match="'auto' or one of"):
        _resolve_device_dtype("cpu", "int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_bf16():
    assert _resolve_device_dtype("cuda", "auto")[1] == torch.bfloat16


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_loads_and_generates(tiny_llava, monkeypatch, native, expected):
    from fastllava import LLaVA
    monkeypatch.setattr(pretrained, "cpu_has_native_bf16", lambda: native)
    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="auto")
    try:
        assert llava.dtype == expected
        assert next(llava.model.parameters()).dtype == expected
        out = llava.generate({"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert out["partial"] is False and isinstance(out["output"], str)
    finally:
        llava.close()
