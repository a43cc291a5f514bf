"""The torch backend's fused-SDPA attention against the torch references, on the CPU.

Held to the FlashAttention bound (tests/tolerances.py) like the Triton kernels, over odd lengths,
GQA ratios, page boundaries, cached prefixes and NaN-poisoned unused cache slots; plus what makes
it safe as the CPU default: a row's output is bit-identical whatever else shares its call (batch
invariance), and a decode riding a prefill step rounds exactly as in a decode step.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.paged_decode_attention import paged_decode_attention_ref
from fastllava.kernels.prefill_attention import prefill_attention_ref
from fastllava.kernels.sdpa_attention import (MIN_BUCKET, context_bucket,
                                              paged_decode_attention_sdpa, prefill_attention_sdpa)
from paging import paged
from test_prefill_attention import packed
from tolerances import assert_flash_bound, describe_mismatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poisoned_cache(lens, H, KVH, D, S, dtype, seed):
    """q and a paged cache holding lens[b] tokens per row at shuffled pages; every other slot,
    and the page unused block-table entries point at, is NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // S) for n in lens]
    P = sum(pages) + 2
    k_cache = torch.full((P, S, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full((P, S, KVH, D), float("nan"), dtype=dtype)
    free = torch.randperm(P, generator=gen).tolist()
    nan_page = free.pop()
    tables = torch.full((len(lens), max(pages) + 1), nan_page, dtype=torch.int32)
    for b, (n, num) in enumerate(zip(lens, pages)):
        own = [free.pop() for _ in range(num)]
        tables[b, :num] = torch.tensor(own, dtype=torch.int32)
        slots = torch.tensor([own[t // S] * S + t % S for t in range(n)], dtype=torch.long)
        k_cache.view(-1, KVH, D)[slots] = torch.randn(n, KVH, D, generator=gen).to(dtype)
        v_cache.view(-1, KVH, D)[slots] = torch.randn(n, KVH, D, generator=gen).to(dtype)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def assert_bits_equal(got, expected, what):
    bad = got != expected
    assert not bad.any(), f"{what}: " + describe_mismatch(got, expected, bad)


def test_context_bucket_depends_on_the_length_only_and_pads_little():
    prev = 0
    for n in range(0, 5000):
        T = context_bucket(n)
        assert T >= max(n, 1) and T % MIN_BUCKET == 0 and T >= prev, n
        if n > 512:
            assert T - n < n / 8 + 1, (n, T)
        prev = T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [16, 64])
@pytest.mark.parametrize("H,KVH,D", [(4, 4, 32), (8, 2, 64), (7, 1, 24)])
def test_decode_matches_reference(H, KVH, D, S, dtype):
    lens = [1, 7, 64, 65, 113, 239, 700]   # one token, mid-page, bucket edges, several buckets
    q, k_cache, v_cache, tables, ctx = poisoned_cache(lens, H, KVH, D, S, dtype, H + S + D)
    scale = D ** -0.5
    out = paged_decode_attention_sdpa(q, k_cache, v_cache, tables, ctx, scale=scale)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, scale=scale)
    ref64 = paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables,
                                       ctx, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_flash_bound(out, ref, ref64)


def test_decode_context_zero_rows_are_zeros():
    q, k_cache, v_cache, tables, ctx = poisoned_cache([5, 1], 4, 2, 16, 16, torch.float32, 0)
    ctx[1] = 0
    out = paged_decode_attention_sdpa(q, k_cache, v_cache, tables, ctx, scale=0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_row_is_bit_identical_alone_and_in_any_batch(dtype):
    """Batch invariance: each row alone, and among rows of other lengths (other buckets, longer
    neighbours in its own bucket), gives the same bits."""
    lens = [3, 60, 64, 65, 127, 300, 301, 1100, 2000]
    q, k_cache, v_cache, tables, ctx = poisoned_cache(lens, 8, 2, 64, 16, dtype, 7)
    together = paged_decode_attention_sdpa(q, k_cache, v_cache, tables, ctx, scale=0.125)
    for b in range(len(lens)):
        alone = paged_decode_attention_sdpa(q[b:b + 1], k_cache, v_cache, tables[b:b + 1],
                                            ctx[b:b + 1], scale=0.125)
        assert_bits_equal(together[b], alone[0], f"row {b} (context {lens[b]})")
    rev = torch.arange(len(lens) - 1, -1, -1)
    shuffled = paged_decode_attention_sdpa(q[rev], k_cache, v_cache, tables[rev], ctx[rev],
                                           scale=0.125)
    assert_bits_equal(shuffled[rev], together, "rows in reverse order")


def prefix_case(prefixes, new, H, KVH, D, S, dtype, seed):
    """q/k/v of the new tokens (packed) and a paged cache holding each prefix."""
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    vs = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    k_cache, v_cache, tables = paged([x[:max(p, 1)] for x, p in zip(ks, prefixes)],
                                     [x[:max(p, 1)] for x, p in zip(vs, prefixes)], S, 64, gen)
    q = torch.randn(sum(new), H, D, generator=gen).to(dtype)
    k = torch.cat([x[p:] for x, p in zip(ks, prefixes)])
    v = torch.cat([x[p:] for x, p in zip(vs, prefixes)])
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    cache = dict(k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                 prefix_lens=torch.tensor(prefixes, dtype=torch.int32))
    return q, k, v, cu, cache


def check_prefill(q, k, v, cu, causal, scale, **cache):
    out = prefill_attention_sdpa(q, k, v, cu, causal=causal, scale=scale, **cache)
    ref = prefill_attention_ref(q, k, v, cu, causal=causal, scale=scale, **cache)
    exact = {n: (t.double() if n.endswith("cache") else t) for n, t in cache.items()}
    ref64 = prefill_attention_ref(q.double(), k.double(), v.double(), cu, causal=causal,
                                  scale=scale, **exact)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_flash_bound(out, ref, ref64)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,H,KVH,D", [([1, 7, 113], 4, 4, 16), ([239, 7], 8, 2, 72),
                                          ([113, 1, 40], 7, 1, 12), ([66, 0, 31], 4, 1, 80),
                                          ([49, 49, 49], 4, 4, 8)])   # equal: one batched call
def test_prefill_matches_reference(lens, H, KVH, D, causal, dtype):
    gen = torch.Generator().manual_seed(sum(lens) + H + D)
    q, k, v, cu, _ = packed(lens, H, KVH, D, dtype, gen, device="cpu")
    check_prefill(q, k, v, cu, causal, D ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [16, 64])
def test_prefill_over_a_cached_prefix(S, dtype):
    """Chunks after a prefix ending mid-page, on a page boundary, or empty; 1-token chunks
    (decodes riding the step) among them."""
    q, k, v, cu, cache = prefix_case([37, S, 0, 70, 5], [13, 1, 9, 40, 1], 8, 2, 24, S, dtype, S)
    check_prefill(q, k, v, cu, True, 24 ** -0.5, **cache)


def test_one_token_chunk_rounds_as_in_a_decode_step():
    """A sequence's decode may ride a prefill step (mixed batch) or run in a decode step: the
    same bits either way, or batch invariance breaks between step kinds."""
    S, prefixes, new = 16, [37, 16, 130], [1, 5, 1]
    q, k, v, cu, cache = prefix_case(prefixes, new, 8, 2, 32, S, torch.float32, 11)
    mixed = prefill_attention_sdpa(q, k, v, cu, causal=True, scale=0.2, **cache)
    for b, row in ((0, 0), (2, 6)):   # rows of the 1-token chunks in the packed batch
        kc, vc = cache["k_cache"].clone(), cache["v_cache"].clone()
        table = cache["block_tables"][b:b + 1]
        slot = table[0, prefixes[b] // S].long() * S + prefixes[b] % S
        kc.view(-1, 2, 32)[slot], vc.view(-1, 2, 32)[slot] = k[row], v[row]   # the KV write
        decode = paged_decode_attention_sdpa(q[row:row + 1], kc, vc, table,
                                             torch.tensor([prefixes[b] + 1]), scale=0.2)
        assert_bits_equal(mixed[row], decode[0], f"sequence {b}")


def test_prefill_sequence_is_bit_identical_alone_and_packed():
    gen = torch.Generator().manual_seed(5)
    lens = [50, 50, 17, 50]
    for causal in (True, False):
        q, k, v, cu, _ = packed(lens, 4, 2, 16, torch.float32, gen, device="cpu")
        together = prefill_attention_sdpa(q, k, v, cu, causal=causal, scale=0.25)
        for b in range(len(lens)):
            lo, hi = int(cu[b]), int(cu[b + 1])
            alone = prefill_attention_sdpa(q[lo:hi], k[lo:hi], v[lo:hi],
                                           torch.tensor([0, hi - lo], dtype=torch.int32),
                                           causal=causal, scale=0.25)
            assert_bits_equal(together[lo:hi], alone, f"sequence {b}, causal={causal}")


def test_every_call_takes_the_fused_kernel():
    """CPU SDPA silently falls back to eager math (slow, other rounding) for inputs its flash
    kernel refuses (3-D tensors, some masks); forcing the flash backend turns that into an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, cu, cache = prefix_case([37, 16, 0], [13, 1, 9], 8, 2, 24, 16, torch.float32, 3)
    dq, k_cache, v_cache, tables, ctx = poisoned_cache([5, 70], 8, 2, 24, 16, torch.float32, 3)
    gen = torch.Generator().manual_seed(3)
    tq, tk, tv, tcu, _ = packed([9, 9], 4, 4, 16, torch.float32, gen, device="cpu")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        prefill_attention_sdpa(q, k, v, cu, causal=True, scale=0.2, **cache)
        prefill_attention_sdpa(tq, tk, tv, tcu, causal=False, scale=0.25)
        paged_decode_attention_sdpa(dq, k_cache, v_cache, tables, ctx, scale=0.2)


def test_scratch_buffers_serve_calls_in_and_out_of_inference_mode():
    """The engine decodes under inference_mode, tests and tools without it, on one thread."""
    q, k_cache, v_cache, tables, ctx = poisoned_cache([300, 9], 4, 2, 16, 16, torch.float32, 4)
    with torch.inference_mode():
        first = paged_decode_attention_sdpa(q, k_cache, v_cache, tables, ctx, scale=0.25)
    again = paged_decode_attention_sdpa(q, k_cache, v_cache, tables, ctx, scale=0.25)
    assert_bits_equal(again, first, "outside inference mode")
