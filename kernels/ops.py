"""The op table the models call. Each entry is a kernel launcher, a fused torch op or a reference.

The models never call a kernel module directly: they hold an `Ops` chosen once at load time.
backend "torch" = fused torch ops (attention through SDPA, kernels/sdpa_attention.py; the other
ops are their references, already one or two torch ops each): the CPU path; "triton" = the
Triton launchers (compiled on CUDA, interpreted on CPU, see kernels/__init__.py); "reference" =
the plain `_ref` functions every kernel is tested against (eager attention, rounding point for
rounding point as transformers' eager run: slow, for checking); "auto" = compiled Triton on CUDA,
"torch" elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fastllava.kernels import gelu, paged_decode_attention, prefill_attention, rms_norm
from fastllava.kernels import rotary_write_kv, sdpa_attention, silu_and_mul
from fastllava.kernels.common import interpreted

BACKENDS = ("auto", "torch", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    rotary_write_kv: Callable
    silu_and_mul: Callable
    gelu: Callable
    prefill_attention: Callable
    paged_decode_attention: Callable


REFERENCE_OPS = Ops(name="reference", rms_norm=rms_norm.rms_norm_ref,
                    rotary_write_kv=rotary_write_kv.rotary_write_kv_ref,
                    silu_and_mul=silu_and_mul.silu_and_mul_ref, gelu=gelu.gelu_ref,
                    prefill_attention=prefill_attention.prefill_attention_ref,
                    paged_decode_attention=paged_decode_attention.paged_decode_attention_ref)

TORCH_OPS = dataclasses.replace(
    REFERENCE_OPS, name="torch", prefill_attention=sdpa_attention.prefill_attention_sdpa,
    paged_decode_attention=sdpa_attention.paged_decode_attention_sdpa)

TRITON_OPS = Ops(name="triton", rms_norm=rms_norm.rms_norm,
                 rotary_write_kv=rotary_write_kv.rotary_write_kv,
                 silu_and_mul=silu_and_mul.silu_and_mul, gelu=gelu.gelu,
                 prefill_attention=prefill_attention.prefill_attention,
                 paged_decode_attention=paged_decode_attention.paged_decode_attention)


def get_ops(backend: str, device_type: str = "cpu") -> Ops:
    """The op table for `backend` on a device of type `device_type` ("cuda" or "cpu")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # the fast path where it exists: kernels compiled for CUDA
        return TRITON_OPS if device_type == "cuda" and not interpreted() else TORCH_OPS
    if backend == "torch":
        return TORCH_OPS
    if backend == "reference":
        return REFERENCE_OPS
    # Kernels were built for one mode when their modules were imported: compiled needs CUDA
    # tensors, interpreted needs CPU tensors.
    if device_type == "cuda" and interpreted():
        raise ValueError("backend='triton' on CUDA, but TRITON_INTERPRET is set: the kernels were "
                         "built for the CPU interpreter; unset it to compile them for the GPU")
    if device_type != "cuda" and not interpreted():
        raise ValueError(f"backend='triton' on device {device_type!r} needs the Triton interpreter: "
                         "set TRITON_INTERPRET=1 before importing fastllava (it is set for you on "
                         "machines without CUDA), or use backend='torch'")
    return TRITON_OPS
