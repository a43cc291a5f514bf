"""Compile every Triton kernel for Hopper (sm_90a) on a machine without a GPU, and report what
ptxas says about each: registers per thread, spill bytes, shared memory, warps.

    TRITON_INTERPRET=0 python tests/kernels/hopper_build.py   # prints one JSON line per kernel
    TRITON_INTERPRET=0 python tests/kernels/hopper_build.py SigLIP   # only cases whose label has it

No GPU is needed: a stand-in Triton driver names the target (CUDA, compute capability 9.0) and
`JITFunction.run` is switched to compile-only (Triton's own `warmup=True` path), so each launcher
runs its real argument checks and grid/constexpr choices on CPU tensors at the real model shapes
and Triton builds the PTX and cubin it would launch on an H100/H200. ptxas (shipped with Triton)
then reports resource usage. This proves the kernels build for the target and fit it; it says
nothing about their numerics on the GPU (the `gpu` tests) or their speed (bench/kernels.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module is imported: compiled JITFunctions

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


class _HopperStandIn:
    """The few driver calls Triton's compile path makes, answered for an sm_90 device."""

    def get_current_target(self):
        return HOPPER

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas_info(ptx: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


def _cases():
    """(label, thunk): each thunk calls one launcher at a real shape on CPU tensors. Every case
    must build, fit an SM and not spill."""
    from fastllava.kernels import gelu, kv_cache_write, paged_decode_attention, prefill_attention
    from fastllava.kernels import rms_norm, rotary, rotary_write_kv, row_cumsum, silu_and_mul

    def qkv(N, H, KVH, D, dt):
        t = torch.empty(N, (H + 2 * KVH) * D, dtype=dt)
        q, k, v = t.split((H * D, KVH * D, KVH * D), dim=-1)
        return q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D)

    def cu(*lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def cache(P, KVH, D, dt):
        return torch.empty(P, 16, KVH, D, dtype=dt)

    bf16 = torch.bfloat16
    q34, k34, v34 = qkv(3000, 56, 8, 128, bf16)
    q13, k13, v13 = qkv(600, 40, 40, 128, bf16)
    qv, kv_, vv = qkv(5 * 577, 16, 16, 64, bf16)
    c34, c13 = cache(400, 8, 128, bf16), cache(400, 40, 128, bf16)
    bt = torch.zeros(32, 200, dtype=torch.int32)
    lens = torch.full((32,), 3000, dtype=torch.int32)
    yield "sampler top-p scan 256 x 64064 fp32", lambda: row_cumsum.row_cumsum(
        torch.empty(256, 64064))
    yield "prefill 34B causal bf16", lambda: prefill_attention.prefill_attention(
        q34, k34, v34, cu(3000), causal=True, scale=0.088)
    yield "prefill 13B causal + paged prefix bf16", lambda: prefill_attention.prefill_attention(
        q13, k13, v13, cu(600), causal=True, scale=0.088, k_cache=c13, v_cache=c13,
        block_tables=bt[:1], prefix_lens=torch.tensor([64], dtype=torch.int32))
    yield "prefill CLIP 5 tiles bidirectional bf16", lambda: prefill_attention.prefill_attention(
        qv, kv_, vv, cu(*[577] * 5), causal=False, scale=0.125)
    q, k, v = qkv(729, 16, 16, 72, bf16)
    # SigLIP so400m (D=72): strides that are multiples of 8 but not 16 elements must still give
    # 16-byte loads (prefill_attention._stride_units), or the tile loads go scalar and spill.
    yield "prefill SigLIP D=72 bidirectional bf16", (
        lambda q=q, k=k, v=v: prefill_attention.prefill_attention(
            q, k, v, cu(729), causal=False, scale=0.118))
    yield "prefill D=72 causal + paged prefix bf16", (  # the cache strides are 8-aligned too
        lambda q=q, k=k, v=v, c=cache(400, 16, 72, bf16): prefill_attention.prefill_attention(
            q, k, v, cu(729), causal=True, scale=0.118, k_cache=c, v_cache=c,
            block_tables=bt[:1], prefix_lens=torch.tensor([64], dtype=torch.int32)))
    for D in (80, 96):
        q, k, v = qkv(300, 8, 8, D, torch.float16)
        yield f"prefill D={D} fp16", lambda q=q, k=k, v=v: prefill_attention.prefill_attention(
            q, k, v, cu(300), causal=True, scale=0.1)
    q, k, v = qkv(300, 8, 2, 128, torch.float32)
    yield "prefill fp32 (ieee dots)", lambda: prefill_attention.prefill_attention(
        q, k, v, cu(300), causal=True, scale=0.1)
    yield "decode 34B batch 1 split-K bf16", lambda: paged_decode_attention.paged_decode_attention(
        q34[:1], c34, c34, bt[:1], lens[:1], scale=0.088)
    yield "decode 13B batch 32 bf16", lambda: paged_decode_attention.paged_decode_attention(
        q13[:32], c13, c13, bt, lens, scale=0.088)
    yield "kv write 34B bf16", lambda: kv_cache_write.write_kv(
        k34, v34, c34, c34, torch.zeros(3000, dtype=torch.int64))
    for hidden in (5120, 7168, 1024):
        x = torch.empty(32, hidden, dtype=bf16)
        yield f"rms_norm + residual {hidden} bf16", lambda x=x: rms_norm.rms_norm(
            x, torch.empty(x.shape[1], dtype=bf16), 1e-5, x)
    yield "rotary 34B bf16", lambda: rotary.rotary(
        q34, k34, torch.empty(3000, 128, dtype=bf16), torch.empty(3000, 128, dtype=bf16))
    for label, (q, k, v, c, N) in {"34B": (q34, k34, v34, c34, 3000),
                                    "13B decode 32": (q13[:32], k13[:32], v13[:32], c13, 32)}.items():
        yield f"rotary + kv write {label} bf16", (
            lambda q=q, k=k, v=v, c=c, N=N: rotary_write_kv.rotary_write_kv(
                q, k, v, torch.zeros(N, dtype=torch.int64), torch.empty(4096, 128, dtype=bf16),
                torch.empty(4096, 128, dtype=bf16), c, c, torch.zeros(N, dtype=torch.int64)))
    # kv_cache_dtype "fp8": the same launchers over float8_e4m3fn pages (KV_FP8 variants).
    fp8 = torch.float8_e4m3fn
    f34, f13 = cache(400, 8, 128, fp8), cache(400, 40, 128, fp8)
    kv_scales = dict(k_scale=0.5, v_scale=0.25)
    yield "decode 34B batch 1 split-K bf16 fp8 KV", lambda: (
        paged_decode_attention.paged_decode_attention(q34[:1], f34, f34, bt[:1], lens[:1],
                                                      scale=0.088, **kv_scales))
    yield "decode 13B batch 32 bf16 fp8 KV", lambda: paged_decode_attention.paged_decode_attention(
        q13[:32], f13, f13, bt, lens, scale=0.088, **kv_scales)
    yield "prefill 13B causal + paged prefix bf16 fp8 KV", lambda: (
        prefill_attention.prefill_attention(
            q13, k13, v13, cu(600), causal=True, scale=0.088, k_cache=f13, v_cache=f13,
            block_tables=bt[:1], prefix_lens=torch.tensor([64], dtype=torch.int32), **kv_scales))
    yield "kv write 34B bf16 fp8 KV", lambda: kv_cache_write.write_kv(
        k34, v34, f34, f34, torch.zeros(3000, dtype=torch.int64), **kv_scales)
    yield "rotary + kv write 34B bf16 fp8 KV", lambda: rotary_write_kv.rotary_write_kv(
        q34, k34, v34, torch.zeros(3000, dtype=torch.int64), torch.empty(4096, 128, dtype=bf16),
        torch.empty(4096, 128, dtype=bf16), f34, f34, torch.zeros(3000, dtype=torch.int64),
        **kv_scales)
    yield "silu_and_mul 34B bf16", lambda: silu_and_mul.silu_and_mul(
        torch.empty(32, 2 * 20480, dtype=bf16))
    for variant in ("quick", "tanh", "erf"):
        yield f"gelu {variant} bf16", lambda variant=variant: gelu.gelu(
            torch.empty(2885, 4096, dtype=bf16), variant)


def main(select: list[str]) -> None:
    """Build the cases whose label contains any of `select` (case-insensitive), or all of them:
    ptxas is CPU heavy, so iterate on one kernel at a time."""
    driver.set_active(_HopperStandIn())
    built: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        built.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    for label, thunk in _cases():
        if select and not any(word.lower() in label.lower() for word in select):
            continue
        start = len(built)
        thunk()
        for name, kernel in built[start:]:
            md = kernel.metadata
            print(json.dumps({"case": label, "kernel": name, "num_warps": md.num_warps,
                              "shared_bytes": md.shared,
                              **_ptxas_info(kernel.asm["ptx"])}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
