"""The op table the models call. Each entry is a kernel launcher or its torch reference.

The models never call a kernel module directly: they hold an `Ops` chosen once at load time, so the
Triton kernels replace the references one by one without touching model code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fastllava.kernels.gelu import gelu_ref
from fastllava.kernels.kv_cache_write import write_kv_ref
from fastllava.kernels.paged_decode_attention import paged_decode_attention_ref
from fastllava.kernels.prefill_attention import prefill_attention_ref
from fastllava.kernels.rms_norm import rms_norm_ref
from fastllava.kernels.rotary import rotary_ref
from fastllava.kernels.silu_and_mul import silu_and_mul_ref

BACKENDS = ("auto", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    rotary: Callable
    silu_and_mul: Callable
    gelu: Callable
    write_kv: Callable
    prefill_attention: Callable
    paged_decode_attention: Callable


TORCH_OPS = Ops(name="torch", rms_norm=rms_norm_ref, rotary=rotary_ref,
                silu_and_mul=silu_and_mul_ref, gelu=gelu_ref, write_kv=write_kv_ref,
                prefill_attention=prefill_attention_ref,
                paged_decode_attention=paged_decode_attention_ref)


def get_ops(backend: str) -> Ops:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError("the Triton kernels are not built yet; use backend='torch'")
    return TORCH_OPS
