"""Attention over an FP8 (e4m3) KV cache: every backend dequantizes on load to exactly the values
the reference sees.

The comparison is "exact to rounding": the kernel over the fp8 cache against the references over
the dequantized cache (the model dtype), held to the same FlashAttention bound as over an ordinary
cache (tests/tolerances.py), and the references themselves are bit-identical whether they are
handed the fp8 cache or its dequantization. Caches are NaN-poisoned where nothing may be read, as
in test_paged_decode_attention. CPU cases run the Triton kernels under the interpreter (it loads
float8e4nv and casts it to fp16/fp32 exactly; fp16 and fp32 only, as everywhere: no bf16 tl.dot);
bf16 runs on a GPU (`gpu`).
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE
from test_paged_decode_attention import LENS, make_case
from paging import paged
from test_sdpa_attention import assert_bits_equal
from tolerances import assert_flash_bound

from fastllava.kernels.kv_quant import FP8_KV_DTYPE, dequantize_kv_ref, quantize_kv_ref
from fastllava.kernels.paged_decode_attention import (paged_decode_attention,
                                                      paged_decode_attention_ref)
from fastllava.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from fastllava.kernels.sdpa_attention import paged_decode_attention_sdpa, prefill_attention_sdpa

K_SCALE, V_SCALE = 0.25, 0.3700000047683716   # a power of two and not (both fp32-exact)
DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
SCALED = dict(k_scale=K_SCALE, v_scale=V_SCALE)


def to_fp8(k_cache, v_cache):
    """(fp8 caches, their dequantization in the model dtype): what the kernels and refs read."""
    k8, v8 = quantize_kv_ref(k_cache, K_SCALE), quantize_kv_ref(v_cache, V_SCALE)
    return (k8, v8), (dequantize_kv_ref(k8, K_SCALE, k_cache.dtype),
                      dequantize_kv_ref(v8, V_SCALE, v_cache.dtype))


def scaled_case(lens, H, KVH, D, S, dtype, seed, **kw):
    """make_case with keys ~8x larger than values (LLaVA-like: |k| ~ 10, |v| ~ 1)."""
    q, k_cache, v_cache, tables, ctx = make_case(lens, H, KVH, D, S, dtype, seed, **kw)
    return q, k_cache * 8, v_cache, tables, ctx


def check_decode(fn, q, k_cache, v_cache, tables, ctx, **kw):
    scale = q.shape[-1] ** -0.5
    (k8, v8), (kd, vd) = to_fp8(k_cache, v_cache)
    out = fn(q, k8, v8, tables, ctx, scale=scale, **SCALED, **kw)
    ref = paged_decode_attention_ref(q, kd, vd, tables, ctx, scale=scale)
    ref8 = paged_decode_attention_ref(q, k8, v8, tables, ctx, scale=scale, **SCALED)
    assert_bits_equal(ref8, ref, "the reference over fp8 vs over its dequantization")
    ref64 = paged_decode_attention_ref(q.double(), kd.double(), vd.double(), tables, ctx,
                                       scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_flash_bound(out, ref, ref64)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [16, 64])
@pytest.mark.parametrize("H,KVH", [(8, 2), (7, 1)])
def test_triton_decode_over_fp8(H, KVH, S, dtype):
    check_decode(paged_decode_attention, *scaled_case(LENS, H, KVH, 64, S, dtype, H + S))


@pytest.mark.parametrize("num_splits", [1, 5])
def test_triton_decode_over_fp8_split(num_splits):
    check_decode(paged_decode_attention, *scaled_case([1023, 1, 239], 8, 2, 16, 16,
                                                      torch.float16, 3), num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sdpa_decode_over_fp8(dtype):
    q, *rest = scaled_case(LENS, 8, 2, 64, 16, dtype, 7)
    check_decode(paged_decode_attention_sdpa, q.cpu(), *(t.cpu() for t in rest))


def on_grid(x, scale):
    return dequantize_kv_ref(quantize_kv_ref(x, scale), scale, x.dtype)


def fp8_prefix_case(prefixes, new, H, KVH, D, S, dtype, seed):
    """Packed new tokens over paged prefixes, as prefix_case, but the cache (fp8, plus its
    dequantization) also holds the new tokens, as after the model's KV write; the new k/v are
    on the fp8 grid, so a backend reading a new token from k or from the cache sees one value."""
    gen = torch.Generator().manual_seed(seed)
    ks = [on_grid(torch.randn(p + n, KVH, D, generator=gen).to(dtype) * 8, K_SCALE)
          for p, n in zip(prefixes, new)]
    vs = [on_grid(torch.randn(p + n, KVH, D, generator=gen).to(dtype), V_SCALE)
          for p, n in zip(prefixes, new)]
    k_cache, v_cache, tables = paged(ks, vs, S, 64, gen)
    (k8, v8), (kd, vd) = to_fp8(k_cache, v_cache)
    q = torch.randn(sum(new), H, D, generator=gen).to(dtype)
    k = torch.cat([x[p:] for x, p in zip(ks, prefixes)])
    v = torch.cat([x[p:] for x, p in zip(vs, prefixes)])
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    base = dict(block_tables=tables, prefix_lens=torch.tensor(prefixes, dtype=torch.int32))
    return q, k, v, cu, dict(base, k_cache=k8, v_cache=v8), dict(base, k_cache=kd, v_cache=vd)


def check_prefill(fn, q, k, v, cu, fp8, deq):
    scale = q.shape[-1] ** -0.5
    out = fn(q, k, v, cu, causal=True, scale=scale, **fp8, **SCALED)
    ref = prefill_attention_ref(q, k, v, cu, causal=True, scale=scale, **deq)
    ref8 = prefill_attention_ref(q, k, v, cu, causal=True, scale=scale, **fp8, **SCALED)
    assert_bits_equal(ref8, ref, "the reference over fp8 vs over its dequantization")
    exact = {n: (t.double() if n.endswith("cache") else t) for n, t in deq.items()}
    ref64 = prefill_attention_ref(q.double(), k.double(), v.double(), cu, causal=True,
                                  scale=scale, **exact)
    assert_flash_bound(out, ref, ref64)


PREFIXES, NEW = [37, 16, 0, 70, 5], [13, 1, 9, 40, 1]   # mid-page, page edge, none; 1-token chunks


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_prefill_over_fp8_prefix(dtype):
    q, k, v, cu, fp8, deq = fp8_prefix_case(PREFIXES, NEW, 8, 2, 24, 16, dtype, 1)
    to = lambda d: {n: t.to(DEVICE) for n, t in d.items()}  # noqa: E731
    check_prefill(prefill_attention, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cu.to(DEVICE),
                  to(fp8), to(deq))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sdpa_prefill_over_fp8_prefix(dtype):
    check_prefill(prefill_attention_sdpa, *fp8_prefix_case(PREFIXES, NEW, 8, 2, 24, 16, dtype, 2))


def test_sdpa_fp8_one_token_chunk_rounds_as_in_a_decode_step():
    """A decode riding a prefill step (its k, v as rotary_write_kv leaves them: the cached
    values) gives the bits of a decode step over the fp8 cache (batch invariance of the torch
    path)."""
    q, k, v, cu, fp8, _ = fp8_prefix_case([37, 16, 130], [1, 5, 1], 8, 2, 32, 16,
                                          torch.float32, 11)
    mixed = prefill_attention_sdpa(q, k, v, cu, causal=True, scale=0.2, **fp8, **SCALED)
    for b, row, prefix in ((0, 0, 37), (2, 6, 130)):
        decode = paged_decode_attention_sdpa(q[row:row + 1], fp8["k_cache"], fp8["v_cache"],
                                             fp8["block_tables"][b:b + 1],
                                             torch.tensor([prefix + 1]), scale=0.2, **SCALED)
        assert_bits_equal(mixed[row], decode[0], f"sequence {b}")


def test_cache_dtype_mismatches_are_refused():
    q, k_cache, v_cache, tables, ctx = make_case([5], 4, 2, 16, 16, torch.float32, 0)
    k8 = k_cache.to(FP8_KV_DTYPE)
    with pytest.raises(ValueError, match="v_cache must have k_cache's dtype"):
        paged_decode_attention(q, k8, v_cache, tables, ctx, scale=0.25)
    with pytest.raises(ValueError, match="k_cache must have q's dtype"):
        paged_decode_attention(q, k_cache.half(), v_cache.half(), tables, ctx, scale=0.25)
    with pytest.raises(ValueError, match="k_scale must be a positive"):
        paged_decode_attention(q, k8, k8, tables, ctx, scale=0.25, k_scale=0.0)
    n = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        prefill_attention(q[:1], q[:1, :2], q[:1, :2], n, causal=True, scale=0.25,
                          k_cache=k8, v_cache=v_cache, block_tables=tables,
                          prefix_lens=n[1:])
