"""paged_decode_attention (Triton, split-K flash decoding) against its torch reference.

Held to the FlashAttention bound (tests/tolerances.py): error vs the float64 reference at most 2x the
same-dtype reference's error plus a rounding atol. Every cache slot and page the kernel must not
read is NaN, and unused block-table entries point at an all-NaN page: reading any of them turns the
output NaN (NaN V rows survive a zero softmax weight), so masking is proven by the result.
CPU cases run under the Triton interpreter (fp16, fp32); bf16 and model-sized shapes need a GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_device import DEVICE
from tolerances import assert_flash_bound

from fastllava.kernels.paged_decode_attention import (BLOCK_N, MAX_SPLITS, _split_bounds,
                                                      choose_num_splits, paged_decode_attention,
                                                      paged_decode_attention_ref)

LENS = [1, 7, 113, 239]  # one token, mid-page, and contexts crossing several pages


def make_case(lens, H, KVH, D, S, dtype, seed, *, table_dtype=torch.int32, spare_pages=3,
              width=None):
    """Random q and a NaN-poisoned paged cache holding len tokens per sequence at shuffled pages.
    width: block-table columns (default: the longest sequence's pages + 2), as in a CUDA graph
    whose table is as wide as max_context whatever the real contexts are."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // S) for n in lens]
    P = sum(pages_per_seq) + spare_pages + 1
    k_cache = torch.full((P, S, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full((P, S, KVH, D), float("nan"), dtype=dtype)
    perm = torch.randperm(P, generator=gen).tolist()
    nan_page = perm.pop()  # never written: every unused block-table entry points here
    width = width or max(pages_per_seq) + 2
    tables = torch.full((len(lens), width), nan_page, dtype=table_dtype)
    for b, (n, num_pages) in enumerate(zip(lens, pages_per_seq)):
        pages = [perm.pop() for _ in range(num_pages)]
        tables[b, :num_pages] = torch.tensor(pages, dtype=table_dtype)
        slots = torch.tensor([pages[t // S] * S + t % S for t in range(n)], dtype=torch.long)
        flat_k, flat_v = k_cache.view(P * S, KVH, D), v_cache.view(P * S, KVH, D)
        flat_k[slots] = torch.randn(n, KVH, D, generator=gen).to(dtype)
        flat_v[slots] = torch.randn(n, KVH, D, generator=gen).to(dtype)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=table_dtype)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(tables), to(context_lens)


def check(q, k_cache, v_cache, tables, context_lens, **kwargs):
    scale = q.shape[-1] ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale=scale, **kwargs)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, context_lens, scale=scale)
    ref64 = paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables,
                                       context_lens, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert_flash_bound(out, ref, ref64)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("S", [16, 64])
@pytest.mark.parametrize("H,KVH", [(4, 4), (8, 2), (7, 1)])  # GQA 1, 4, 7 (non-pow2 group)
def test_gqa_page_sizes(H, KVH, S, dtype):
    check(*make_case(LENS, H, KVH, 80, S, dtype, seed=H * 10 + S))


@pytest.mark.parametrize("num_splits", [1, 2, 5, 24, MAX_SPLITS])
def test_forced_splits_with_long_context(num_splits):
    """1 split (direct write), several, and more splits than 64-token tiles (empty splits, -inf)."""
    lens = [1023, 1, 7, 239]
    check(*make_case(lens, 7, 1, 16, 16, torch.float16, seed=num_splits), num_splits=num_splits)


@pytest.mark.parametrize("D", [8, 12, 64, 96, 128])
def test_head_dims(D):
    check(*make_case([5, 70, 130], 8, 2, D, 16, torch.float32, seed=D))


def test_strided_q_view_and_int64_tables():
    """q split out of a fused (B, H + 2 KVH, D + 3) buffer: rows and heads are strided."""
    H, KVH, D = 8, 2, 72
    q, k_cache, v_cache, tables, lens = make_case(LENS, H, KVH, D, 16, torch.float16, seed=5,
                                                  table_dtype=torch.int64)
    fused = torch.randn(len(LENS), H + 2 * KVH, D + 3, dtype=q.dtype, device=q.device)
    fused[:, :H, :D] = q
    q_view = fused[:, :H, :D]
    assert not q_view.is_contiguous()
    check(q_view, k_cache, v_cache, tables, lens, num_splits=3)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_zero_context_rows_give_zeros(num_splits):
    """context_len 0 (CUDA-graph padding rows): zeros, no NaN, other rows unaffected."""
    q, k_cache, v_cache, tables, lens = make_case([0, 113, 0, 7], 8, 2, 16, 16, torch.float32,
                                                  seed=6)
    out = check(q, k_cache, v_cache, tables, lens, num_splits=num_splits)
    zero_rows = out[[0, 2]]
    assert not zero_rows.any(), f"context 0 rows not zero: max |x| {zero_rows.abs().max().item()}"


@pytest.mark.parametrize("H,KVH,dtype", [(8, 2, torch.float16), (8, 2, torch.float32),
                                          (7, 1, torch.float16)])
def test_contexts_far_below_the_table_width(H, KVH, dtype):
    """A 512-page table (8192 tokens, a CUDA graph's width) over contexts of 1..800 tokens, odd
    lengths included, at the split count the heuristic picks for that width and at forced ones:
    each sequence cuts its own context, so every split reduces real tokens (see the bounds test)."""
    lens = [1, 17, 100, 800, 333]
    case = make_case(lens, H, KVH, 32, 16, dtype, seed=H + KVH, width=512)
    assert case[3].shape[1] == 512
    for num_splits in (None, 7, MAX_SPLITS):
        check(*case, num_splits=num_splits)


@triton.jit
def _split_bounds_probe(ctx_ptr, out_ptr, num_splits, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    lo, hi = _split_bounds(tl.load(ctx_ptr + b), split, num_splits, BLOCK_N)
    tl.store(out_ptr + (b * num_splits + split) * 2, lo)
    tl.store(out_ptr + (b * num_splits + split) * 2 + 1, hi)


@pytest.mark.parametrize("num_splits", [1, 2, 7, MAX_SPLITS])
def test_split_chunks_follow_each_context(num_splits):
    """The kernel's own chunking (run on device): chunks tile [0, ctx) in order, are whole
    BLOCK_N tiles except the last, and as many splits as ctx's tiles allow hold tokens: a
    short context is not parked in the first split of a table-sized chunk."""
    lens = [0, 1, 17, 63, 64, 65, 100, 800, 8191, 8192]
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = torch.full((len(lens), num_splits, 2), -7, dtype=torch.int32, device=DEVICE)
    _split_bounds_probe[(len(lens), num_splits)](ctx, out, num_splits, BLOCK_N=BLOCK_N)
    for n, bounds in zip(lens, out.cpu().tolist()):
        spans = [(lo, hi) for lo, hi in bounds if lo < hi]
        ends = [0] + [hi for _, hi in spans]
        assert [lo for lo, _ in spans] == ends[:-1] and ends[-1] == n, (n, bounds)
        assert all(lo % BLOCK_N == 0 for lo, _ in spans), (n, bounds)
        tiles = -(-n // BLOCK_N)
        busy = len(spans)
        # ceil(tiles / ceil(tiles / splits)) splits hold tokens: all of them once tiles >= splits.
        assert busy == (-(-tiles // -(-tiles // num_splits)) if tiles else 0), (n, bounds)


def test_split_count_never_changes_the_math():
    """Different split counts reduce the same tokens: all agree to fp32 rounding."""
    case = make_case([300, 64, 1], 4, 2, 32, 64, torch.float32, seed=7)
    outs = [paged_decode_attention(*case, scale=0.2, num_splits=n) for n in (1, 3, 8)]
    for n, out in zip((3, 8), outs[1:]):
        diff = (out - outs[0]).abs().max().item()
        assert diff < 1e-6, f"num_splits={n} differs from 1 split by {diff:.3e}"


def test_num_splits_heuristic_uses_shapes_only():
    # Large batch x KV heads already fills the GPU: one split, no merge launch.
    assert choose_num_splits(B=64, KVH=8, max_ctx=4096) == 1
    # Batch 1 over a long cache splits it; never more splits than tiles or MAX_SPLITS.
    many = choose_num_splits(B=1, KVH=8, max_ctx=4096)
    assert 8 <= many <= MAX_SPLITS, many
    assert MAX_SPLITS // 2 < choose_num_splits(B=1, KVH=1, max_ctx=100_000) <= MAX_SPLITS
    assert choose_num_splits(B=1, KVH=8, max_ctx=100) == 2  # 2 tiles of BLOCK_N
    for B, KVH, max_ctx in [(1, 8, 4096), (2, 40, 777), (3, 1, 1023), (1, 1, 1)]:
        n = choose_num_splits(B, KVH, max_ctx)
        tiles = -(-max_ctx // BLOCK_N)
        chunk_tiles = -(-tiles // n)
        assert n * chunk_tiles >= tiles and (n - 1) * chunk_tiles < tiles, (B, KVH, max_ctx, n)


def test_rejects_bad_inputs():
    q, k_cache, v_cache, tables, lens = make_case([3, 9], 4, 2, 16, 16, torch.float32, seed=8)
    bad = [
        (dict(q=q[0]), "q must be"),
        (dict(k_cache=k_cache[..., :8]), "k_cache must be"),
        (dict(v_cache=v_cache[:1]), "v_cache must"),
        (dict(q=q[:, :3]), "multiple of"),
        (dict(k_cache=k_cache.half(), v_cache=v_cache.half()), "k_cache must have q's dtype"),
        (dict(block_tables=tables[:1]), "block_tables must be"),
        (dict(block_tables=tables.float()), "block_tables must be int32 or int64"),
        (dict(context_lens=lens[:1]), "context_lens must be"),
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous last dim"),
    ]
    base = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens)
    for change, message in bad:
        args = {**base, **change}
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(args.pop("q"), *args.values(), scale=0.25)
    for bad_splits in (0, MAX_SPLITS + 1):
        with pytest.raises(ValueError, match="num_splits"):
            paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.25,
                                   num_splits=bad_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KVH,D,S", [(56, 8, 128, 16), (40, 40, 128, 16), (32, 8, 64, 64),
                                       (28, 4, 80, 16)])
def test_gpu_model_shapes(H, KVH, D, S, dtype):
    lens = [1, 17, 600, 2950, 4097, 64, 333, 1000]
    check(*make_case(lens, H, KVH, D, S, dtype, seed=H + D + S))
    check(*make_case(lens[:2], H, KVH, D, S, dtype, seed=1), num_splits=1)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [None, 512])   # 512 pages: a max_context-wide graph table
def test_gpu_cuda_graph_replay_with_new_context_lens(width):
    """Captured once, replayed with other context lengths: the grid depends on shapes only."""
    q, k_cache, v_cache, tables, lens = make_case([900, 5, 300, 64], 32, 8, 128, 16,
                                                  torch.bfloat16, seed=9, width=width)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.1)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.1)
    for new in ([900, 5, 300, 64], [1, 0, 299, 17]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale=0.1)
        ref64 = paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables,
                                           lens, scale=0.1)
        assert_flash_bound(out, ref, ref64)
