"""Triton prefill attention against the torch reference (FlashAttention error bound).

The fp16/fp32 sweeps run where the kernels run (kernel_device: the interpreter on CPU, which cannot
do bf16 dots, or the GPU); bf16, the real head dims and long sequences are GPU-only tests. The exact reference is the torch reference in float64;
the kernel's error must stay within FLASH_FACTOR x the same-dtype torch reference's error.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels import prefill_attention as prefill_module
from fastllava.kernels.paged_decode_attention import paged_decode_attention
from fastllava.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from fastllava.kernels.sdpa_attention import prefill_attention_sdpa
from kernel_device import DEVICE
from paging import paged
from tolerances import assert_flash_bound


def packed(lens, H, KVH, D, dtype, gen, device=DEVICE):
    """q, k, v as strided views of one fused qkv buffer (as the model produces them)."""
    N = sum(lens)
    qkv = torch.randn(N, (H + 2 * KVH) * D, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.split((H * D, KVH * D, KVH * D), dim=-1)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D), cu, qkv


def check(q, k, v, cu, causal, scale, **prefix):
    out = prefill_attention(q, k, v, cu, causal=causal, scale=scale, **prefix)
    ref_same = prefill_attention_ref(q, k, v, cu, causal=causal, scale=scale, **prefix)
    exact = {n: (t.double() if n.endswith("cache") else t) for n, t in prefix.items()}
    ref64 = prefill_attention_ref(q.double(), k.double(), v.double(), cu, causal=causal,
                                  scale=scale, **exact)
    assert_flash_bound(out, ref_same, ref64)
    return out


CASES = [  # (lens, H, KVH, D): odd lengths, several sequences, GQA 1/4/7, odd head dims
    ([1, 7, 113], 4, 4, 16),
    ([239, 7], 8, 2, 72),
    ([113, 1, 40], 7, 1, 12),
    ([66, 0, 31], 4, 1, 80),   # an empty sequence in the middle of the batch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,H,KVH,D", CASES)
def test_varlen_matches_reference(lens, H, KVH, D, causal, dtype):
    gen = torch.Generator().manual_seed(sum(lens) + H + D)
    q, k, v, cu, _ = packed(lens, H, KVH, D, dtype, gen)
    check(q, k, v, cu, causal, D ** -0.5)


@pytest.mark.parametrize("pad", [1, 2])
def test_unaligned_strides(pad):
    """Strides that share no factor of 16 (ALIGN 1 and 2, rows padded by `pad` elements): the
    launcher passes strides in units of their common alignment and the kernel must scale back."""
    gen = torch.Generator().manual_seed(pad)
    H, KVH, D, lens = 4, 2, 24, [37, 20]
    q, k, v = (torch.randn(sum(lens), n, D + pad, generator=gen).half().to(DEVICE)[..., :D]
               for n in (H, KVH, KVH))
    cu = torch.tensor([0, 37, 57], dtype=torch.int32, device=DEVICE)
    for causal in (True, False):
        check(q, k, v, cu, causal, D ** -0.5)


def test_long_sequence_fp16():
    gen = torch.Generator().manual_seed(7)
    q, k, v, cu, _ = packed([1023], 2, 1, 16, torch.float16, gen)
    check(q, k, v, cu, True, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [16, 64])
def test_cached_prefix(page_size, dtype):
    """Chunked prefill / prefix cache: new tokens see the paged prefix plus causal new tokens.
    Prefixes end mid-page, exactly on a page boundary, and are empty."""
    gen = torch.Generator().manual_seed(page_size)
    H, KVH, D = 8, 2, 24
    prefixes, new = [37, page_size, 0, 70], [13, 1, 9, 40]
    ks = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    vs = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    k_cache, v_cache, tables = paged([x[:max(p, 1)] for x, p in zip(ks, prefixes)],
                                     [x[:max(p, 1)] for x, p in zip(vs, prefixes)],
                                     page_size, 40, gen)
    q = torch.randn(sum(new), H, D, generator=gen).to(dtype)
    k = torch.cat([x[p:] for x, p in zip(ks, prefixes)])
    v = torch.cat([x[p:] for x, p in zip(vs, prefixes)])
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    check(to(q), to(k), to(v), to(cu), True, D ** -0.5, k_cache=to(k_cache), v_cache=to(v_cache),
          block_tables=to(tables), prefix_lens=to(torch.tensor(prefixes, dtype=torch.int32)))


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs these tile sizes in every test")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_tile_sizes_on_the_interpreter(dtype, monkeypatch):
    """The interpreter runs 32x32 tiles, the GPU 128x64 (16-bit) and 32x16 (fp32): a causal
    query block then spans several key tiles, the last ones partly or wholly above the diagonal
    for some rows. The same kernel at the GPU's tile sizes, on the CPU (num_warps / num_stages
    mean nothing to the interpreter)."""
    monkeypatch.setattr(prefill_module, "interpreted", lambda: False)
    assert prefill_module._block_sizes(dtype)[:2] in ((128, 64), (32, 16))
    gen = torch.Generator().manual_seed(11)
    q, k, v, cu, _ = packed([300, 1, 129, 64], 2, 1, 16, dtype, gen)
    for causal in (True, False):
        check(q, k, v, cu, causal, 0.25)
    test_cached_prefix(16, dtype)


def mixed_step(prefixes, new, H, KVH, D, S, dtype, gen, device=DEVICE):
    """A mixed step as the model runs it: every sequence's prefix AND new tokens already in the
    paged cache (rotary_write_kv writes before attention), the new tokens' k/v also packed."""
    ks = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    vs = [torch.randn(p + n, KVH, D, generator=gen).to(dtype) for p, n in zip(prefixes, new)]
    pages = sum(-(-(p + n) // S) for p, n in zip(prefixes, new)) + 3
    k_cache, v_cache, tables = paged(ks, vs, S, pages, gen)
    q = torch.randn(sum(new), H, D, generator=gen).to(dtype)
    k = torch.cat([x[p:] for x, p in zip(ks, prefixes)])
    v = torch.cat([x[p:] for x, p in zip(vs, prefixes)])
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(cu), dict(
        k_cache=to(k_cache), v_cache=to(v_cache), block_tables=to(tables),
        prefix_lens=to(torch.tensor(prefixes, dtype=torch.int32)))


def check_decode_rows(prefixes, new, d, H, KVH, D, S, dtype, device=DEVICE):
    gen = torch.Generator().manual_seed(sum(prefixes) + d)
    q, k, v, cu, cache = mixed_step(prefixes, new, H, KVH, D, S, dtype, gen, device)
    scale = D ** -0.5
    out = prefill_attention(q, k, v, cu, causal=True, scale=scale, decode_rows=d, **cache)
    # Rows 0..d-1 are the decode kernel's, bit for bit (context = prefix + the new token) ...
    as_decode = paged_decode_attention(q[:d], cache["k_cache"], cache["v_cache"],
                                       cache["block_tables"][:d], cache["prefix_lens"][:d] + 1,
                                       scale=scale)
    assert torch.equal(out[:d], as_decode)
    # ... the other rows are exactly what the prefill kernel gives them without the split ...
    whole = prefill_attention(q, k, v, cu, causal=True, scale=scale, **cache)
    assert torch.equal(out[d:], whole[d:])
    # ... and the whole step is attention, within the FlashAttention bound.
    ref_same = prefill_attention_ref(q, k, v, cu, causal=True, scale=scale, **cache)
    exact = {n: (t.double() if n.endswith("cache") else t) for n, t in cache.items()}
    ref64 = prefill_attention_ref(q.double(), k.double(), v.double(), cu, causal=True,
                                  scale=scale, **exact)
    assert_flash_bound(out, ref_same, ref64)
    for other in (prefill_attention_ref, prefill_attention_sdpa):   # the hint changes nothing
        assert torch.equal(other(q, k, v, cu, causal=True, scale=scale, decode_rows=d, **cache),
                           other(q, k, v, cu, causal=True, scale=scale, **cache))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefixes,new,d", [
    ([37, 16, 70, 20, 0, 5], [1, 1, 1, 13, 9, 1], 3),   # decodes, then chunks (a 1-token one too)
    ([40, 1], [1, 1], 2),                                # decodes only
    ([33, 15], [1, 30], 1),                              # one decode beside a chunk
])
def test_decode_rows_run_as_decodes(prefixes, new, d, dtype):
    """A mixed step's leading 1-token chunks over a cached prefix (decode_rows) go through the
    paged decode kernel; the prefill kernel skips them and computes the rest unchanged."""
    check_decode_rows(prefixes, new, d, 8, 2, 24, 16, dtype)


def test_decode_rows_bad_values_raise():
    gen = torch.Generator().manual_seed(9)
    q, k, v, cu, cache = mixed_step([5, 3], [1, 4], 4, 2, 16, 16, torch.float32, gen)
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match="decode_rows"):
            prefill_attention(q, k, v, cu, causal=True, scale=0.25, decode_rows=bad, **cache)
    with pytest.raises(ValueError, match="decode_rows"):       # no cached prefix given
        prefill_attention(q, k, v, cu, causal=True, scale=0.25, decode_rows=1)


def test_writes_only_its_rows_and_leaves_inputs_alone():
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu, qkv = packed([5, 9], 4, 2, 16, torch.float32, gen)
    before = qkv.clone()
    out = prefill_attention(q, k, v, cu, causal=True, scale=0.25)
    assert out.shape == q.shape and out.is_contiguous()
    assert torch.equal(qkv, before), "the kernel wrote into its inputs"


def test_bad_inputs_raise():
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu, _ = packed([4], 6, 4, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention(q, k, v, cu, causal=True, scale=1.0)
    q, k, v, cu, _ = packed([4], 4, 2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="dtypes differ"):
        prefill_attention(q, k.half(), v, cu, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="last dim"):
        prefill_attention(q.transpose(1, 2), k, v, cu, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="without k_cache"):
        prefill_attention(q, k, v, cu, causal=True, scale=1.0,
                          prefix_lens=torch.zeros(1, device=DEVICE))


# ---- GPU: bf16, the real head dims, long sequences, the vision tower's shape ----------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("lens,H,KVH", [([3000], 56, 8), ([600, 1, 239], 40, 40), ([1023, 113], 28, 4)])
def test_gpu_real_shapes(lens, H, KVH, D, dtype):
    gen = torch.Generator().manual_seed(D)
    q, k, v, cu, _ = packed(lens, H, KVH, D, dtype, gen, device="cuda")
    check(q, k, v, cu, True, D ** -0.5)


@pytest.mark.gpu
def test_gpu_vision_tiles_bidirectional():
    gen = torch.Generator().manual_seed(5)
    q, k, v, cu, _ = packed([577] * 5, 16, 16, 64, torch.bfloat16, gen, device="cuda")
    check(q, k, v, cu, False, 64 ** -0.5)


@pytest.mark.gpu
def test_gpu_cached_prefix_bf16():
    gen = torch.Generator().manual_seed(6)
    H, KVH, D, S = 56, 8, 128, 16
    prefixes, new = [2900, 37], [100, 600]
    ks = [torch.randn(p + n, KVH, D, generator=gen).bfloat16() for p, n in zip(prefixes, new)]
    vs = [torch.randn(p + n, KVH, D, generator=gen).bfloat16() for p, n in zip(prefixes, new)]
    k_cache, v_cache, tables = paged([x[:p] for x, p in zip(ks, prefixes)],
                                     [x[:p] for x, p in zip(vs, prefixes)], S, 400, gen)
    q = torch.randn(sum(new), H, D, generator=gen).bfloat16().cuda()
    k = torch.cat([x[p:] for x, p in zip(ks, prefixes)]).cuda()
    v = torch.cat([x[p:] for x, p in zip(vs, prefixes)]).cuda()
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    check(q, k, v, cu, True, D ** -0.5, k_cache=k_cache.cuda(), v_cache=v_cache.cuda(),
          block_tables=tables.cuda(), prefix_lens=torch.tensor(prefixes, dtype=torch.int32).cuda())


@pytest.mark.gpu
def test_gpu_decode_rows_real_shapes():
    """34B's heads (56 / 8, D 128) in bf16, 64 decodes at ~2-3k context beside a 512-token chunk
    of an image prompt: the mixed step an arrival makes while the batch decodes."""
    prefixes = [2000 + 17 * i for i in range(64)] + [2400]
    check_decode_rows(prefixes, [1] * 64 + [512], 64, 56, 8, 128, 16, torch.bfloat16, "cuda")


def test_packed_rows_past_int32_offsets():
    """A sequence whose first packed row lies more than 2^31 elements into q/k/v (~140k tokens of
    a fused 13B qkv, 15360 per row) must be read there, not at an int32-wrapped offset. Here rows
    of a fused qkv view are 2^26 + 16 elements apart, so the second sequence starts past 2^31:
    only the rows written are ever touched (the buffer is virtual memory, ~9 GB of it untouched),
    and the buffer starts 2^31 elements before q, so a wrapped offset reads zeros there instead of
    faulting."""
    H, KVH, D, lens = 2, 1, 16, [32, 3]
    N, stride, base = sum(lens), 2**26 + 16, 2**31 + 64
    assert lens[0] * stride >= 2**31 > (max(lens) - 1) * stride  # only the start overflows
    buf = torch.empty(base + (N - 1) * stride + (H + 2 * KVH) * D, dtype=torch.float16)
    qkv = buf.as_strided((N, (H + 2 * KVH) * D), (stride, 1), base)
    qkv.copy_(torch.randn(N, (H + 2 * KVH) * D, generator=torch.Generator().manual_seed(9)))
    q, k, v = qkv.split((H * D, KVH * D, KVH * D), dim=-1)
    q, k, v = q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    for causal in (True, False):
        check(q, k, v, cu, causal, D ** -0.5)
