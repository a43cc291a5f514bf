"""The CPU attention path: prefill and paged decode through torch's fused SDPA.

Same contracts as prefill_attention_ref / paged_decode_attention_ref (shapes, GQA grouping, paged
cache, prefixes, context-0 rows give zeros), but each call is one fused
`F.scaled_dot_product_attention` (on CPU: a flash kernel with fp32 scores and online softmax, which
also runs bf16 on AMX/AVX512-BF16) instead of eager matmul + softmax per sequence. Numerics are the
FlashAttention kind (fp32 scores, never rounded to the input dtype): in fp32 they differ from the
eager reference by a few ulps; tests hold them to the FlashAttention bound like the Triton kernels.

Batch invariance by construction: a row's arithmetic depends only on its own inputs, never on the
other rows of the step. SDPA rows are independent across the batch dim, but the CPU kernel's sums
run over the padded key length (vector lanes, tails), so padding a row to the longest context of
the step would change its rounding with the batch. Decode rows are therefore padded to
`context_bucket(own length)` and run in one call per bucket: the same keys, the same padding and
the same arithmetic whether a request runs alone or among 63 others, in a decode step or riding a
prefill step as a 1-token chunk. Multi-token prefill chunks run one sequence per call (their cost is
the T x L math, not the call), except equal-length bidirectional batches (the vision tower's tiles),
which are one batched call.
Shapes: q (N, H, D); k, v (N, KVH, D); caches (P, S, KVH, D); block_tables (B, max_pages).
An fp8 cache is gathered as stored (1 byte per element) and dequantized with the layer's
k_scale / v_scale (kernels/kv_quant.load_kv_ref) into the model dtype before SDPA.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from fastllava.kernels.kv_quant import load_kv_ref

MIN_BUCKET = 64  # keys a decode row is padded to, at least: a multiple of every SIMD width


def context_bucket(n: int) -> int:
    """Padded key length for a row of n context tokens: a multiple of MIN_BUCKET, and of 1/8 of
    n's power of two above that (at most ~12.5% padding, 8 buckets per octave of context)."""
    step = max(MIN_BUCKET, 1 << max(0, n.bit_length() - 4))
    return max(step, -(-n // step) * step)


# Gathered K/V land in scratch buffers reused from call to call, one set per thread (each engine
# runs its steps on one thread). A fresh 100 MB tensor costs more in first-touch page faults than
# the copy itself (glibc serves big allocations from new mmaps): reusing one makes the gather ~3x
# faster on CPU. A buffer grows to the largest gather seen and is held for the thread's life.
_scratch = threading.local()


def _scratch_buffer(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    bufs = _scratch.__dict__.setdefault("bufs", {})
    key = (slot, like.dtype, like.device)
    numel = math.prod(shape)
    if key not in bufs or bufs[key].numel() < numel:
        with torch.inference_mode(False):   # a normal tensor: writable in and out of inference mode
            bufs[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return bufs[key][:numel].view(shape)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, T: int,
                   slot: str) -> torch.Tensor:
    """The first T token slots of each row's pages, (P, S, KVH, D) → (b, T, KVH, D), in one
    index_select into the `slot` scratch buffer (valid until the next gather into that slot);
    slots past the block table's width come back as zeros."""
    S = cache.shape[1]
    num_pages = min(-(-T // S), block_tables.shape[1])
    pages = block_tables[:, :num_pages].reshape(-1).long()
    x = _scratch_buffer(slot, (pages.numel(), *cache.shape[1:]), cache)
    torch.index_select(cache, 0, pages, out=x)
    x = x.view(block_tables.shape[0], num_pages * S, *cache.shape[2:])   # (b, pages*S, KVH, D)
    if x.shape[1] >= T:
        return x[:, :T]
    return torch.cat((x, x.new_zeros(x.shape[0], T - x.shape[1], *x.shape[2:])), dim=1)


def attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (b, H, D) over keys k, v (b, T, KVH, D) of which the first lens[b] are real → (b, H, D).
    k and v are the caller's gathered copies: keys past a row's length are zeroed in them (unused
    slots may hold NaN, and 0 x NaN is NaN) and masked out; GQA heads of
    one KV head are the G queries of one (b, kvh) attention, so K/V are never repeated."""
    b, H, D = q.shape
    T, KVH = k.shape[1], k.shape[2]
    valid = torch.arange(T, device=q.device)[None, :] < lens[:, None]          # (b, T)
    k[~valid], v[~valid] = 0, 0   # in place: only the padding rows are written
    o = F.scaled_dot_product_attention(q.view(b, KVH, H // KVH, D), k.transpose(1, 2),
                                       v.transpose(1, 2), attn_mask=valid[:, None, None, :],
                                       scale=scale)                            # (b, KVH, G, D)
    return o.reshape(b, H, D).masked_fill((lens == 0)[:, None, None], 0)     # context 0: zeros


def _by_bucket(lens: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(lens):
        groups.setdefault(context_bucket(n), []).append(row)
    return groups


def _gather_kv(q, k_cache, v_cache, block_tables, T: int, k_scale: float, v_scale: float):
    """The first T slots of each row's keys and values in q's dtype, (b, T, KVH, D) each."""
    return (load_kv_ref(gather_context(k_cache, block_tables, T, "k"), k_scale, q.dtype),
            load_kv_ref(gather_context(v_cache, block_tables, T, "v"), v_scale, q.dtype))


def paged_decode_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                                scale: float, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> torch.Tensor:
    lens = context_lens.long()
    groups = _by_bucket(lens.tolist())
    if len(groups) == 1:   # the common case: no row indexing at all
        (T, _), = groups.items()
        k, v = _gather_kv(q, k_cache, v_cache, block_tables, T, k_scale, v_scale)
        return attend_one_token(q, k, v, lens, scale)
    out = torch.empty_like(q)
    for T, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        k, v = _gather_kv(q, k_cache, v_cache, block_tables[idx], T, k_scale, v_scale)
        out[idx] = attend_one_token(q[idx], k, v, lens[idx], scale)
    return out


def _one_token_rows(q, k, v, rows, starts, prefixes, k_cache, v_cache, block_tables, scale,
                    k_scale, v_scale, out) -> None:
    """1-token chunks over a cached prefix (decodes riding a prefill step): the decode path's
    padded rows, with the new token's K/V placed at its position, so they round exactly as in a
    decode step. (With an fp8 cache, k and v already hold the dequantized values the cache gives:
    kernels/rotary_write_kv.)"""
    for T, group in _by_bucket([prefixes[b] + 1 for b in rows]).items():
        seqs = [rows[i] for i in group]
        idx = torch.tensor(seqs, device=q.device)
        tok = torch.tensor([starts[b] for b in seqs], device=q.device)
        pos = torch.tensor([prefixes[b] for b in seqs], device=q.device)
        keys, vals = _gather_kv(q, k_cache, v_cache, block_tables[idx], T, k_scale, v_scale)
        ar = torch.arange(len(seqs), device=q.device)
        keys[ar, pos], vals[ar, pos] = k[tok], v[tok]
        out[tok] = attend_one_token(q[tok], keys, vals, pos + 1, scale)


def _causal_from(T: int, L: int, device) -> torch.Tensor:
    """(T, L) bool: query i (at position L - T + i) sees keys 0 .. L - T + i."""
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, *, causal: bool, scale: float,
                           k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                           block_tables: torch.Tensor | None = None,
                           prefix_lens: torch.Tensor | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, decode_rows: int = 0) -> torch.Tensor:
    """decode_rows: the Triton launcher's hint; ignored, the riders (1-token chunks over a prefix,
    wherever they sit) are found from cu_seqlens, read on the host here anyway."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    B = len(bounds) - 1
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * B
    lens = [bounds[b + 1] - bounds[b] for b in range(B)]
    if B and not causal and not any(prefixes) and len(set(lens)) == 1 and lens[0]:
        T = lens[0]   # equal-length bidirectional sequences (vision tiles): one batched call
        qb, kb, vb = (x.unflatten(0, (B, T)).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)
    riders = [b for b in range(B) if causal and lens[b] == 1 and prefixes[b] > 0]
    if riders:
        _one_token_rows(q, k, v, riders, bounds, prefixes, k_cache, v_cache, block_tables, scale,
                        k_scale, v_scale, out)
    for b in set(range(B)) - set(riders):
        lo, hi, prefix = bounds[b], bounds[b + 1], prefixes[b]
        if hi == lo:
            continue
        kb, vb = k[lo:hi], v[lo:hi]                                    # (T, KVH, D)
        if prefix:
            kp, vp = _gather_kv(q, k_cache, v_cache, block_tables[b:b + 1], prefix, k_scale,
                                v_scale)
            kb, vb = torch.cat((kp[0], kb)), torch.cat((vp[0], vb))
        mask = _causal_from(hi - lo, kb.shape[0], q.device) if causal and prefix else None
        # 4-D inputs: CPU SDPA runs its flash kernel only on (B, H, T, D), else eager math.
        o = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
            attn_mask=mask, is_causal=causal and not prefix, scale=scale,
            enable_gqa=True)                                           # (1, H, T, D)
        out[lo:hi] = o[0].transpose(0, 1)
    return out
