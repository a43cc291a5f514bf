"""The attention references agree with plain dense softmax attention (float64 ground truth).

These pin down the paged-cache contract (page layout, block tables, context lengths ending
mid-page, GQA head grouping, prefixes) that the Triton kernels must then reproduce.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.kv_cache_write import write_kv_ref
from fastllava.kernels.paged_decode_attention import paged_decode_attention_ref
from fastllava.kernels.prefill_attention import prefill_attention_ref
from paging import dense, paged


@pytest.mark.parametrize("H,KVH", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_decode_matches_dense(H, KVH, page_size):
    gen = torch.Generator().manual_seed(H * 100 + page_size)
    D, lens = 32, [1, 7, 113, 239]  # contexts ending mid-page and on page 1
    ks = [torch.randn(n, KVH, D, generator=gen) for n in lens]
    vs = [torch.randn(n, KVH, D, generator=gen) for n in lens]
    k_cache, v_cache, tables = paged(ks, vs, page_size, 64, gen)
    q = torch.randn(len(lens), H, D, generator=gen)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens),
                                     scale=D ** -0.5)
    for b in range(len(lens)):
        ref = dense(q[b:b + 1], ks[b], vs[b], D ** -0.5, causal=False)[0]
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_varlen_matches_dense(causal):
    gen = torch.Generator().manual_seed(1)
    H, KVH, D, lens = 8, 2, 16, [1, 7, 113]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens), H, D, generator=gen)
    k = torch.randn(sum(lens), KVH, D, generator=gen)
    v = torch.randn(sum(lens), KVH, D, generator=gen)
    out = prefill_attention_ref(q, k, v, cu, causal=causal, scale=0.3)
    for b in range(len(lens)):
        lo, hi = cu[b].item(), cu[b + 1].item()
        ref = dense(q[lo:hi], k[lo:hi], v[lo:hi], 0.3, causal)
        torch.testing.assert_close(out[lo:hi].double(), ref, atol=1e-5, rtol=1e-5)


def test_prefill_with_cached_prefix_equals_full_prefill():
    """Chunked prefill: new tokens after a cached prefix see the prefix plus causal new tokens."""
    gen = torch.Generator().manual_seed(2)
    H, KVH, D, page_size = 4, 2, 16, 16
    total, prefixes = [50, 33], [37, 16]  # prefix ends mid-page / exactly on a page boundary
    ks = [torch.randn(n, KVH, D, generator=gen) for n in total]
    vs = [torch.randn(n, KVH, D, generator=gen) for n in total]
    qs = [torch.randn(n, H, D, generator=gen) for n in total]
    k_cache, v_cache, tables = paged([k[:p] for k, p in zip(ks, prefixes)],
                                     [v[:p] for v, p in zip(vs, prefixes)], page_size, 32, gen)
    new = [n - p for n, p in zip(total, prefixes)]
    cu = torch.tensor([0, new[0], new[0] + new[1]], dtype=torch.int32)
    cat = lambda xs: torch.cat([x[p:] for x, p in zip(xs, prefixes)])  # noqa: E731
    out = prefill_attention_ref(cat(qs), cat(ks), cat(vs), cu, causal=True, scale=D ** -0.5,
                                k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                                prefix_lens=torch.tensor(prefixes))
    for b in range(2):
        ref = dense(qs[b], ks[b], vs[b], D ** -0.5, causal=True)[prefixes[b]:]
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_kv_write_is_exact_and_skips_padding():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64).half()
    v = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64).half()
    k_cache = torch.zeros(4, 16, 2, 8, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 15, -1, 16, 63, -1])
    write_kv_ref(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(64, 2, 8), v_cache.view(64, 2, 8)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(64) if s not in written]
    assert not flat_k[untouched].any() and not flat_v[untouched].any(), "a padding row was written"
