"""Attention over packed variable-length sequences (prefill, and the vision towers).

Sequences are packed along N: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] of q/k/v. Each
query attends to its own sequence only — causally for the decoder, bidirectionally for the vision
towers — and, optionally, first to a prefix of `prefix_lens[b]` tokens already in the paged KV cache
(prefix caching, chunked prefill): the new tokens sit at positions prefix_len .. prefix_len + T - 1.
GQA: query head h reads KV head h // (H // KVH) (consecutive query heads share a KV head).

Numerics are transformers' eager attention, rounding point for rounding point: scores = q @ k^T
in the input dtype (fp32 accumulate, rounded), times scale (rounded again), softmax in fp32,
probabilities rounded to the input dtype, then @ v in the input dtype. In bf16 this makes the CPU
path bit-identical to transformers' eager run; flash-style kernels (fp32 scores, online softmax)
are held to the FlashAttention bound against it: at most ~2x the error of this same-dtype run.
Shapes: q (N, H, D); k, v (N, KVH, D); cu_seqlens (B+1,) int; out (N, H, D).
A float8_e4m3fn cache (kv_cache_dtype "fp8") is dequantized with the layer's k_scale / v_scale as
its tiles load (kernels/kv_quant.py); the step's own new tokens are read from k and v, which
rotary_write_kv has already set to the values the fp8 cache gives back.

The Triton kernel is FlashAttention-2: for a block of BLOCK_M queries of one head it walks the keys
in BLOCK_N tiles — first the cached prefix through the block table, then the new tokens (up to the
diagonal when causal) — keeping a running max and sum in fp32 (online softmax, exp2 with log2(e)
folded into the scale); scores are fp32 accumulations of input-dtype dots, probabilities are cast to
the input dtype for the p @ v dot (fp32 accumulate), and the output is rounded once at the end.
Varlen without a host sync (so a step never waits on the GPU to size its grid): program p of axis 0
belongs to the sequence b with start[b] <= p < start[b+1], start[b] = cu_seqlens[b] // BLOCK_M + b,
found by binary search in the kernel; sum_b ceil(len_b / BLOCK_M) <= N // BLOCK_M + B programs
suffice (vLLM's unified-attention trick). Programs past their sequence's end exit at once.
Strides arrive in units of ALIGN elements (see _stride_units) so that Triton can prove 16-byte
alignment at head dims that are not multiples of 16 (SigLIP's 72).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastllava.kernels.common import (FP_FUSION, check_attention_inputs, dot_precision,
                                      interpreted)
from fastllava.kernels.kv_quant import check_scales, is_fp8, load_kv, load_kv_ref
from fastllava.kernels.paged_decode_attention import paged_decode_attention

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(cu_seqlens, pid, B, BLOCK_M: tl.constexpr):
    """The b in [0, B) with cu[b] // BLOCK_M + b <= pid (largest such b)."""
    lo = 0
    hi = B
    while lo < hi - 1:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens + mid) // BLOCK_M + mid
        if start <= pid:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One key tile of the online softmax: scores in fp32 (log2 units), rescale the running
    max/sum/accumulator, add p @ v with p cast to v's dtype (FA2's rounding point)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


# Ints Triton would specialize (== 1, % 16) and that change from step to step compile a new
# variant mid-traffic: B, FIRST (the decode rows a mixed step runs elsewhere), the block-table
# width, and the row strides, which a 1-token step's views report differently. The strides'
# alignment is the constexpr ALIGN's job (_stride_units), so no stride is specialized.
_STEP_INTS = ["B", "FIRST", "stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn",
              "stride_vh", "stride_on", "stride_oh", "stride_cp", "stride_cs", "stride_ch",
              "stride_bt"]


@triton.jit(do_not_specialize=_STEP_INTS)
def _prefill_attention_kernel(
        Q, K, V, O, cu_seqlens, KC, VC, block_tables, prefix_lens,
        B, FIRST, qk_scale, k_scale, v_scale,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
        stride_cp, stride_cs, stride_ch, stride_bt,
        GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
        ALIGN: tl.constexpr, KV_FP8: tl.constexpr):
    # Back to elements; the constexpr factor is what tells Triton every offset is ALIGN-aligned.
    stride_qn, stride_qh, stride_on, stride_oh = (stride_qn * ALIGN, stride_qh * ALIGN,
                                                  stride_on * ALIGN, stride_oh * ALIGN)
    stride_kn, stride_kh, stride_vn, stride_vh = (stride_kn * ALIGN, stride_kh * ALIGN,
                                                  stride_vn * ALIGN, stride_vh * ALIGN)
    stride_cp, stride_cs, stride_ch = stride_cp * ALIGN, stride_cs * ALIGN, stride_ch * ALIGN
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    b = _find_seq(cu_seqlens, pid, B, BLOCK_M)
    seq_lo = tl.load(cu_seqlens + b)
    T = tl.load(cu_seqlens + b + 1) - seq_lo
    m_start = (pid - (seq_lo // BLOCK_M + b)) * BLOCK_M
    if m_start >= T or b < FIRST:      # past its sequence, or a decode row run elsewhere
        return

    # Packed row r lies r * row stride elements in, past 2^31 (int32) from ~140k tokens of a fused
    # 13B qkv (15360 per row): a sequence's first row is an int64 offset. Offsets within one
    # sequence (< max_position_embeddings rows) and within a tile stay int32.
    seq_row = seq_lo.to(tl.int64)
    row0 = seq_row + m_start
    rows = tl.arange(0, BLOCK_M)
    offs_m = m_start + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < T
    q = tl.load(Q + row0 * stride_qn + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PREFIX:
        # Cached prefix: every new query sees all of it (it precedes them all), so no causal mask.
        P = tl.load(prefix_lens + b)
        for n0 in range(0, P, BLOCK_N):
            j = n0 + offs_n
            j_ok = j < P
            page = tl.load(block_tables + b * stride_bt + j // S, mask=j_ok, other=0)
            row = page.to(tl.int64) * stride_cp + (j % S) * stride_cs + kvh * stride_ch
            kv_mask = j_ok[:, None] & d_ok[None, :]
            kv_ptrs = row[:, None] + offs_d[None, :]
            k = load_kv(KC + kv_ptrs, kv_mask, k_scale, q, KV_FP8).to(q.dtype)
            v = load_kv(VC + kv_ptrs, kv_mask, v_scale, q, KV_FP8).to(q.dtype)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, j_ok[None, :], qk_scale,
                                          True, PRECISION)

    # New tokens of this sequence. Key tiles wholly below the diagonal (causal) or wholly inside
    # the sequence (bidirectional) need no mask; only the diagonal / ragged tail tiles do.
    if IS_CAUSAL:
        full = m_start  # BLOCK_N divides BLOCK_M, so tiles before m_start are fully visible
        hi = tl.minimum(T, m_start + BLOCK_M)
    else:
        full = T - T % BLOCK_N
        hi = T
    k_row = K + seq_row * stride_kn + kvh * stride_kh + offs_d[None, :]
    v_row = V + seq_row * stride_vn + kvh * stride_vh + offs_d[None, :]
    for n0 in range(0, full, BLOCK_N):
        j = n0 + offs_n
        k = tl.load(k_row + j[:, None] * stride_kn, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_row + j[:, None] * stride_vn, mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, None, qk_scale, False, PRECISION)
    for n0 in range(full, hi, BLOCK_N):
        j = n0 + offs_n
        j_ok = j < T
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_row + j[:, None] * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_row + j[:, None] * stride_vn, mask=kv_mask, other=0.0)
        keep = j_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (j[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, True, PRECISION)

    out = acc / l_i[:, None]
    tl.store(O + row0 * stride_on + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _block_sizes(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit on Hopper: 128x64 tiles, 8 warps (two
    warpgroups of 64 query rows each) and a 3-stage K/V pipeline: 128 KiB of shared memory at
    D=128 and no register spills (ptxas, see tests/kernels/hopper_build.py); with 4 warps the
    D=64 vision tiles need twice the registers per thread. Head dims pad to BLOCK_D, the next
    power of two, so D=72 (SigLIP), 80 and 96 build exactly like D=128 (~200 registers, 128 KiB,
    no spills) once their rows are provably 16-byte aligned (_stride_units): they need no tiles
    of their own, and smaller ones would only lower the tensor-core work per K/V byte loaded.
    At D=72 the 56 padded columns are wasted dot work; a 64 + 16 split of the head dim would
    recover most of it, but that is unmeasured (no GPU run yet) and the vision tower is a small
    share of a request. fp32 inputs use IEEE FMA dots whose operands live in registers: 32x16
    tiles are the largest that do not spill. The interpreter prefers few, large programs."""
    if interpreted():
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 32, 16, 8, 1
    return 128, 64, 8, 3


def _stride_units(*strides: int) -> tuple[int, list[int]]:
    """(ALIGN, each stride // ALIGN), ALIGN the largest power of two <= 16 dividing them all.

    Triton marks an int argument aligned only when it is a multiple of 16. At D=72 the head
    stride is 72 elements, so it could not prove any row 16-byte aligned: it loaded q/k/v one
    bf16 at a time (a 64-bit address per element, 255 registers, 120 bytes of spills) and could
    not use cp.async, so the K/V pipeline was off. Passed as stride/8 and multiplied back by a
    constexpr 8, every row is provably 8-element aligned: 16-byte cp.async loads, 3 stages, 197
    registers and no spills - the same build as D=80/96. Stride 0 (broadcast) divides anything."""
    align = math.gcd(16, *strides)
    return align, [s // align for s in strides]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor, *, causal: bool, scale: float,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      block_tables: torch.Tensor | None = None,
                      prefix_lens: torch.Tensor | None = None, k_scale: float = 1.0,
                      v_scale: float = 1.0, decode_rows: int = 0) -> torch.Tensor:
    """Triton launcher; same contract as prefill_attention_ref. q, k, v may be strided views
    (only the last dim must be contiguous); the cache, if given, is (P, S, KVH, D) contiguous,
    in q's dtype or fp8 (dequantized with k_scale / v_scale).

    decode_rows = d > 0 (host int) promises that sequences 0..d-1 are 1-token chunks over a
    cached prefix whose K/V are already in the cache (the decodes riding a mixed step): they
    run through the paged decode kernel, context prefix + 1, as in a decode step, and this
    kernel's programs for them exit at once. Here each would take a whole BLOCK_M-row query
    tile per head for its one row and walk its prefix at 1/BLOCK_M of the tile's work: an
    estimated 1-2 ms per 34B layer for 64 such rows, against ~0.1 ms as decodes."""
    has_prefix = prefix_lens is not None
    check_attention_inputs(q, k, v, cu_seqlens, k_cache, v_cache, block_tables, prefix_lens,
                           has_prefix)
    check_scales(k_cache, k_scale, v_scale)
    if has_prefix and not causal:
        raise ValueError("a cached prefix (prefix_lens) is only supported with causal=True")
    B = cu_seqlens.shape[0] - 1
    if not (isinstance(decode_rows, int) and 0 <= decode_rows <= B
            and (has_prefix or not decode_rows)):
        raise ValueError(f"decode_rows must be an int in [0, {B}], > 0 only with a cached "
                         f"prefix, got {decode_rows!r}")
    N, H, D = q.shape
    KVH = k.shape[1]
    out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
    if N == 0 or B == 0:
        return out
    if decode_rows:     # rows 0..d-1, one per sequence; the kernel below skips those sequences
        d = decode_rows
        out[:d] = paged_decode_attention(q[:d], k_cache, v_cache, block_tables[:d],
                                         prefix_lens[:d] + 1, scale=scale, k_scale=k_scale,
                                         v_scale=v_scale)
        if d == B:
            return out
    BLOCK_M, BLOCK_N, num_warps, num_stages = _block_sizes(q.dtype)
    assert BLOCK_M % BLOCK_N == 0  # the causal loop split relies on it
    if has_prefix:
        kc, vc, bt, pl = k_cache, v_cache, block_tables, prefix_lens
        S = k_cache.shape[1]
        cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0))
    else:  # unused pointers: any tensor will do
        kc = vc = bt = pl = cu_seqlens
        S, cache_strides = 1, (0, 0, 0, 0)
    # A dim of size 1 is only ever indexed at 0: its stride (which torch reports differently for
    # one-token views) must not lower ALIGN, or a 1-token step would build its own variant.
    strided = [(t.stride(i) if t.shape[i] > 1 else 0) for t in (q, k, v, out) for i in (0, 1)]
    align, strides = _stride_units(*strided, *cache_strides[:3])
    grid = (N // BLOCK_M + B, H)
    _prefill_attention_kernel[grid](
        q, k, v, out, cu_seqlens, kc, vc, bt, pl, B, decode_rows, scale * _LOG2E, k_scale,
        v_scale, *strides,
        cache_strides[3],
        GROUP=H // KVH, D=D, S=S, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)), IS_CAUSAL=causal, HAS_PREFIX=has_prefix,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        ALIGN=align, KV_FP8=has_prefix and is_fp8(k_cache), enable_fp_fusion=FP_FUSION)
    return out


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` token rows of one sequence from a paged cache (P, S, KVH, D) → (L, KVH, D)."""
    S = cache.shape[1]
    num_pages = (length + S - 1) // S
    return cache[block_table[:num_pages].long()].flatten(0, 1)[:length]


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | None) -> torch.Tensor:
    """One sequence. q (T, H, D); k, v (L, KVH, D). With causal_offset c, query i sees keys ≤ i + c."""
    T, H, _ = q.shape
    L, KVH, _ = k.shape
    group = H // KVH
    k = k.repeat_interleave(group, dim=1).permute(1, 2, 0)  # (H, D, L)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)   # (H, L, D)
    scores = torch.matmul(q.transpose(0, 1), k) * scale     # (H, T, L), input dtype
    if causal_offset is not None:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + causal_offset, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1)           # (T, H, D)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, causal: bool, scale: float,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None,
                          prefix_lens: torch.Tensor | None = None, k_scale: float = 1.0,
                          v_scale: float = 1.0, decode_rows: int = 0) -> torch.Tensor:
    """decode_rows: the launcher's hint (leading 1-token rows over a cached prefix); every row
    here is its own sequence anyway, so it changes nothing."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        kb, vb = k[lo:hi], v[lo:hi]
        prefix = int(prefix_lens[b]) if prefix_lens is not None else 0
        if prefix:
            kb = torch.cat((load_kv_ref(gather_pages(k_cache, block_tables[b], prefix), k_scale,
                                        k.dtype), kb))
            vb = torch.cat((load_kv_ref(gather_pages(v_cache, block_tables[b], prefix), v_scale,
                                        v.dtype), vb))
        out[lo:hi] = attend_ref(q[lo:hi], kb, vb, scale, prefix if causal else None)
    return out
