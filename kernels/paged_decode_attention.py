"""Decode attention: one new query token per sequence over its paged KV cache.

Sequence b's keys/values are the first context_lens[b] slots of the pages listed in
block_tables[b] (its own new token included: the KV write runs first). GQA as in prefill.
Numerics: transformers' eager attention, as in prefill_attention.attend_ref.
Shapes: q (B, H, D); k_cache, v_cache (P, S, KVH, D); block_tables (B, max_pages) int;
context_lens (B,) int; out (B, H, D). The cache is in q's dtype or float8_e4m3fn; fp8 tiles are
dequantized with the layer's k_scale / v_scale as they load (kernels/kv_quant.py), to exactly the
values the reference's `load_kv_ref` gives, before the dots.

Kernel: flash-decoding (split-K), two launches.
- Stage 1, grid (B, KVH, num_splits): one program takes all `group = H // KVH` query heads that
  share KV head kvh (padded to BLOCK_H >= 16 rows so `tl.dot` maps onto tensor cores; pad rows are
  masked) over one contiguous chunk of sequence b. The chunk follows b's own context, not the table
  width: chunk = cdiv(ctx, num_splits) rounded up to whole BLOCK_N tiles (`_split_bounds`), so a
  short context is still spread over the splits instead of filling the first one and leaving the
  rest idle (13B batch 1 at 800 tokens in an 8192-token table: 7 chunks of 128, not 640 + 160 in 2).
  It walks the chunk BLOCK_N tokens at a time, gathering each token's slot through the block
  table, so any page size works and unused slots, pages and block-table entries past
  context_lens[b] are never read. Scores q.k accumulate in fp32 (IEEE fp32 dot for fp32 inputs,
  not tf32) and are scaled by scale * log2(e), so the online softmax runs in fp32 with exp2. Each
  program writes its normalised partial output (fp32) and its log-sum-exp (base 2) per
  (b, h, split) to fp32 scratch.
- Stage 2, grid (B, H): merges the splits, out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) with
  M = max_s lse_s, and writes q's dtype. A split past the context has lse = -inf and weight 0.
  With one split, stage 1 writes out directly and stage 2 is skipped.
Compile variants: the split count, the table width and max_ctx are runtime ints that Triton must
not specialize (`do_not_specialize`), so a new batch size or table width never compiles a kernel
while serving; only SINGLE_SPLIT (and dtype/model shapes) select a variant.
Unlike the reference, scores and softmax are never rounded to the input dtype (only P before the
P @ V dot is): held to the FlashAttention bound (tests/tolerances.py), not to bit-equality.

context_lens[b] == 0 (a CUDA-graph padding row) yields zeros for that row, never NaN. Values are
clamped to max_pages * S; page ids are trusted (checking them would sync the host).
num_splits depends on shapes only (B, KVH, max_pages * S), never on context_lens values, so a
captured CUDA graph stays valid for any contexts; see `choose_num_splits`.
Reference: Dao et al., "Flash-Decoding for long-context inference" (2023); SGLang/vLLM Triton
decode attention (two-stage split-KV with log-sum-exp merge, GQA heads packed per program).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastllava.kernels.common import FP_FUSION, dot_precision
from fastllava.kernels.kv_quant import FP8_KV_DTYPE, check_scales, is_fp8, load_kv, load_kv_ref

BLOCK_N = 64  # KV tokens per inner step: 2 x 16 KiB K/V tiles at D=128 in 16-bit, 4 warps.
TARGET_PROGRAMS = 264  # 2 stage-1 programs per SM on H100/H200 (132 SMs): enough loads in flight.
REF_GROUP_TOKENS = 1 << 16  # the torch reference gathers at most this many K/V rows at once
MAX_SPLITS = 64  # bounds stage-2 work and scratch at B * H * 64 * D fp32.


@triton.jit
def _split_bounds(ctx, split, num_splits, BLOCK_N: tl.constexpr):
    """Tokens [lo, hi) of a ctx-token context that split `split` of num_splits reduces: chunks of
    cdiv(ctx, num_splits) tokens rounded up to whole BLOCK_N tiles (only the last tile of a chunk
    is ragged). Splits past the context get lo >= hi (empty)."""
    per_split = (ctx + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, ctx)


@triton.jit(do_not_specialize=["stride_btb", "max_ctx", "num_splits"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, ctx_ptr, out_ptr, part_ptr,
                         lse_ptr, qk_scale, k_scale, v_scale, stride_qb, stride_qh, stride_btb,
                         max_ctx, num_splits,
                         H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                         GROUP: tl.constexpr, SINGLE_SPLIT: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows                       # query heads of this GQA group
    mask_h = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)   # (BLOCK_H, BLOCK_D)

    ctx = tl.minimum(tl.load(ctx_ptr + b).to(tl.int32), max_ctx)
    lo, hi = _split_bounds(ctx, split, num_splits, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max of log2-scaled scores
    l_i = tl.zeros([BLOCK_H], tl.float32)                 # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n
        mask_n = t < hi
        page = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + t // S, mask=mask_n, other=0)
        slot = page.to(tl.int64) * S + t % S
        kv_off = slot[:, None] * (KVH * D) + kvh * D + d[None, :]       # (BLOCK_N, BLOCK_D)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = load_kv(k_cache_ptr + kv_off, kv_mask, k_scale, q, KV_FP8)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # fp32 (H, N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every step holds >= 1 valid token (start < hi), so m_new is finite and no exp2 sees
        # (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_kv(v_cache_ptr + kv_off, kv_mask, v_scale, q, KV_FP8)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (past the context, or context 0) has l_i = 0: partial 0, lse -inf.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = mask_h[:, None] & mask_d[None, :]
    row = b.to(tl.int64) * H + heads                  # (b, h) row of contiguous (B, H, ...)
    if SINGLE_SPLIT:
        tl.store(out_ptr + row[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * num_splits + split, lse, mask=mask_h)
        tl.store(part_ptr + (row[:, None] * num_splits + split) * D + d[None, :], o,
                 mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, H: tl.constexpr, D: tl.constexpr,
                         BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """num_splits is a runtime int (one build for every split count): the weights come from one
    masked BLOCK_SPLITS-wide load of the log-sum-exps, the partials are summed one split at a
    time (a (BLOCK_SPLITS, D) fp32 tile would cost 64 registers per thread)."""
    row = tl.program_id(0).to(tl.int64) * H + tl.program_id(1)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse_row = lse_ptr + row * num_splits
    lse = tl.load(lse_row + sp, mask=sp < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)          # all splits empty (context 0): weights 0
    total = tl.sum(tl.exp2(lse - m), 0)                # empty splits (lse -inf) weigh 0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(lse_row + s) - m)
        acc += w * tl.load(part_ptr + (row * num_splits + s) * D + d, mask=d < D, other=0.0)
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def choose_num_splits(B: int, KVH: int, max_ctx: int) -> int:
    """Splits per sequence from shapes only: enough (b, kvh, split) programs to fill the GPU.

    B * KVH programs already saturate the SMs at large batch (one split, no merge launch); a
    small batch over a long cache splits it into up to MAX_SPLITS chunks. The count is sized by
    the table (max_pages * S) so it stays fixed per CUDA graph; each sequence then cuts its own
    context into that many chunks (`_split_bounds`), so short contexts keep every split busy.
    """
    num_blocks = max(1, triton.cdiv(max_ctx, BLOCK_N))
    want = triton.cdiv(TARGET_PROGRAMS, max(1, B * KVH))
    splits = max(1, min(want, num_blocks, MAX_SPLITS))
    return triton.cdiv(num_blocks, triton.cdiv(num_blocks, splits))  # drop splits left empty


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                           num_splits: int | None = None) -> torch.Tensor:
    """Attention of q (B, H, D) over each sequence's paged KV → out (B, H, D) in q's dtype.

    num_splits forces the split count (tests); by default `choose_num_splits` picks it.
    k_scale / v_scale dequantize an fp8 cache (ignored for others).
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale)
    B, H, D = q.shape
    _, S, KVH, _ = k_cache.shape
    max_ctx = block_tables.shape[1] * S
    if num_splits is None:
        num_splits = choose_num_splits(B, KVH, max_ctx)
    elif not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}] or None, "
                         f"got {num_splits!r}")
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if num_splits == 1:
        part = lse = out                    # unused: stage 1 writes out directly
    else:
        part = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    group = H // KVH
    BLOCK_D = triton.next_power_of_2(max(D, 16))
    _decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        scale * math.log2(math.e), k_scale, v_scale, q.stride(0), q.stride(1),
        block_tables.stride(0), max_ctx, num_splits, H=H, KVH=KVH, D=D, S=S, GROUP=group,
        SINGLE_SPLIT=num_splits == 1,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        DOT_PRECISION=dot_precision(q.dtype), KV_FP8=is_fp8(k_cache), num_warps=4,
        enable_fp_fusion=FP_FUSION)
    if num_splits > 1:
        _decode_merge_kernel[(B, H)](part, lse, out, num_splits, H=H, D=D,
                                     BLOCK_SPLITS=MAX_SPLITS,
                                     BLOCK_D=BLOCK_D, num_warps=4,
                                     enable_fp_fusion=FP_FUSION)
    return out


def _check(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    B, H, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be (P, S, KVH, {D}), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    KVH = k_cache.shape[2]
    if KVH == 0 or H % KVH:
        raise ValueError(f"q's {H} heads must be a multiple of k_cache's {KVH} KV heads")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (q.dtype, FP8_KV_DTYPE):
            raise ValueError(f"{name} must have q's dtype {q.dtype} or be float8_e4m3fn, "
                             f"got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (P, S, KVH, D)")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be ({B}, max_pages), got {tuple(block_tables.shape)}")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens must be ({B},), got shape {tuple(context_lens.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    check_scales(k_cache, k_scale, v_scale)
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if block_tables.shape[1] and block_tables.stride(1) != 1:
        raise ValueError(f"block_tables rows must be contiguous, got strides {block_tables.stride()}")
    if B > 1 and context_lens.stride(0) != 1:
        raise ValueError(f"context_lens must be contiguous, got stride {context_lens.stride()}")
    if B and q.stride(2) != 1:
        raise ValueError(f"q needs a contiguous last dim, got strides {q.stride()}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all must share a device")


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                               scale: float, k_scale: float = 1.0,
                               v_scale: float = 1.0) -> torch.Tensor:
    """Plain torch, batched: rows are taken in groups whose padded contexts total at most
    REF_GROUP_TOKENS (bounding the gathered K/V copy); each group gathers its pages (B, L, KVH, D), masks keys at or beyond each
    row's context length, and runs one masked softmax. Context-0 rows give zeros."""
    B = q.shape[0]
    out = torch.zeros_like(q)
    lens = context_lens.tolist()
    lo = 0
    while lo < B:
        L = max(lens[lo], 1)
        hi = lo + 1
        while hi < B and (hi + 1 - lo) * max(L, lens[hi]) <= REF_GROUP_TOKENS:
            L = max(L, lens[hi])
            hi += 1
        out[lo:hi] = _decode_rows_ref(q[lo:hi], k_cache, v_cache, block_tables[lo:hi],
                                      context_lens[lo:hi], L, scale, k_scale, v_scale)
        lo = hi
    return out


def _decode_rows_ref(q, k_cache, v_cache, block_tables, context_lens, L: int, scale: float,
                     k_scale: float, v_scale: float):
    """q (b, H, D) → (b, H, D) over the first L cached tokens of each row (masked per row)."""
    b, H, D = q.shape
    S, KVH = k_cache.shape[1], k_cache.shape[2]
    beyond = torch.arange(L, device=q.device)[None, :] >= context_lens[:, None].long()  # (b, L)
    pages = block_tables[:, :-(-L // S)].long()
    k = load_kv_ref(k_cache[pages].flatten(1, 2)[:, :L], k_scale, q.dtype)   # (b, L, KVH, D)
    v = load_kv_ref(v_cache[pages].flatten(1, 2)[:, :L], v_scale, q.dtype)
    v = v.masked_fill(beyond[:, :, None, None], 0)                # unused slots may hold NaN
    qg = q.reshape(b, KVH, H // KVH, D)                           # GQA: group g of head kvh
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale       # (b, KVH, G, L), input dtype
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = probs.nan_to_num(0.0)                                  # context 0: all keys masked
    return torch.einsum("bkgl,blkd->bkgd", probs, v).reshape(b, H, D)
