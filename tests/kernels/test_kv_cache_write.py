"""write_kv (Triton scatter into the paged KV cache) is bit-exact against write_kv_ref.

Both start from the same garbage-filled caches, so a padding row (-1) written anywhere, a row
written to the wrong slot, or a stray store past a row shows up as a mismatch of whole caches.
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE
from tolerances import assert_exact, assert_flash_bound

from fastllava.kernels.kv_cache_write import write_kv, write_kv_ref
from fastllava.kernels.paged_decode_attention import (paged_decode_attention,
                                                      paged_decode_attention_ref)


def fused_kv(N, KVH, D, dtype, gen, H=4):
    """k, v (N, KVH, D) as strided views of a fused qkv output, padded so even the head stride
    (D + 3) differs from D: only the last dim is contiguous."""
    qkv = torch.randn(N, H + 2 * KVH, D + 3, generator=gen).to(dtype).to(DEVICE)[..., :D]
    return qkv[:, H:H + KVH], qkv[:, H + KVH:]


def slots_with_padding(N, num_slots, gen, slot_dtype):
    """Distinct random slots, every third row -1 (padding)."""
    slots = torch.randperm(num_slots, generator=gen)[:N]
    slots[::3] = -1
    return slots.to(slot_dtype).to(DEVICE)


def run_both(k, v, slots, P, S, cache_dtype, gen):
    KVH, D = k.shape[1:]
    garbage = torch.randn(2, P, S, KVH, D, generator=gen).mul(1e3).to(cache_dtype).to(DEVICE)
    k_cache, v_cache = garbage[0].clone(), garbage[1].clone()
    k_ref, v_ref = garbage[0].clone(), garbage[1].clone()
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_ref(k, v, k_ref, v_ref, slots)
    assert_exact(k_cache, k_ref)
    assert_exact(v_cache, v_ref)
    return k_cache, v_cache


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("KVH,D", [(2, 64), (3, 12), (1, 72)])
def test_exact_strided_with_padding_rows(KVH, D, dtype, slot_dtype):
    gen = torch.Generator().manual_seed(KVH * D)
    P, S, N = 5, 16, 37
    k, v = fused_kv(N, KVH, D, dtype, gen)
    assert not k.is_contiguous() and k.stride(-1) == 1
    slots = slots_with_padding(N, P * S, gen, slot_dtype)
    k_cache, _ = run_both(k, v, slots, P, S, dtype, gen)
    # The comparison with the ref is only meaningful if real rows landed: check one directly.
    row = 1
    slot = int(slots[row])
    assert torch.equal(k_cache.view(P * S, KVH, D)[slot], k[row])


def test_casts_to_cache_dtype_like_the_ref():
    """fp32 rows into an fp16 cache round as torch's .to(float16) does (nearest even)."""
    gen = torch.Generator().manual_seed(1)
    k, v = fused_kv(20, 2, 16, torch.float32, gen)
    run_both(k, v, slots_with_padding(20, 64, gen, torch.int64), 4, 16, torch.float16, gen)


def test_all_padding_and_empty_batch_write_nothing():
    gen = torch.Generator().manual_seed(2)
    k, v = fused_kv(6, 2, 8, torch.float16, gen)
    run_both(k, v, torch.full((6,), -1, dtype=torch.int32, device=DEVICE), 2, 16,
             torch.float16, gen)
    run_both(k[:0], v[:0], torch.empty(0, dtype=torch.int64, device=DEVICE), 2, 16,
             torch.float16, gen)


def test_rejects_bad_inputs():
    k = torch.zeros(4, 2, 8)
    cache = torch.zeros(3, 16, 2, 8)
    slots = torch.arange(4)
    bad = [
        ((k[0], k, cache, cache, slots), "k must be"),
        ((k, k[:3], cache, cache, slots), "v must have"),
        ((k, k, cache[..., :4], cache, slots), "k_cache must be"),
        ((k, k, cache, cache[:2], slots), "v_cache must have"),
        ((k, k, cache, cache, slots[:3]), "slot_mapping must be"),
        ((k, k, cache, cache, slots.float()), "slot_mapping must be int32 or int64"),
        ((k.int(), k.int(), cache, cache, slots), "k must be float16"),
        ((k, k.half(), cache, cache, slots), "v must have k's dtype"),
        ((k.transpose(1, 2).contiguous().transpose(1, 2), k, cache, cache, slots),
         "contiguous last dim"),
        ((k, k, cache.transpose(0, 1).contiguous().transpose(0, 1), cache, slots),
         "must be contiguous"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            write_kv(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_write_then_decode_equals_reference_path(dtype):
    """Prefill K/V then one decode token per sequence, written by slot mapping, then attended."""
    gen = torch.Generator().manual_seed(3)
    H, KVH, D, S, P = 8, 2, 16, 16, 24
    lens = [5, 40, 17]  # contexts after the decode token was written
    tables = torch.randperm(P, generator=gen)[:3 * 4].view(3, 4).int().to(DEVICE)
    rows = [(b, t) for b, n in enumerate(lens) for t in range(n)]
    slots = [int(tables[b, t // S]) * S + t % S for b, t in rows]
    N = len(rows)
    k, v = fused_kv(N, KVH, D, dtype, gen)
    nan = torch.full((2, P, S, KVH, D), float("nan"), dtype=dtype, device=DEVICE)
    caches, ref_caches = nan.clone(), nan.clone()
    last = [sum(lens[:b + 1]) - 1 for b in range(len(lens))]  # each sequence's decode token
    prefill = [i for i in range(N) if i not in last]
    for cache, write in ((caches, write_kv), (ref_caches, write_kv_ref)):
        for part in (prefill, last):  # two steps, each padded with -1 rows (graph padding)
            idx = torch.tensor(part + [0, 0], device=DEVICE)
            step_slots = torch.tensor([slots[i] for i in part] + [-1, -1], device=DEVICE)
            write(k[idx], v[idx], cache[0], cache[1], step_slots)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, caches[0], caches[1], tables, context_lens, scale=0.25)
    ref = paged_decode_attention_ref(q, ref_caches[0], ref_caches[1], tables, context_lens,
                                     scale=0.25)
    ref64 = paged_decode_attention_ref(q.double(), ref_caches[0].double(), ref_caches[1].double(),
                                       tables, context_lens, scale=0.25)
    assert_flash_bound(out, ref, ref64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("KVH,D", [(8, 128), (40, 128), (4, 80)])
def test_gpu_model_shapes(KVH, D, dtype):
    gen = torch.Generator().manual_seed(KVH + D)
    P, S, N = 300, 16, 3001
    k, v = fused_kv(N, KVH, D, dtype, gen, H=7 * KVH)
    run_both(k, v, slots_with_padding(N, P * S, gen, torch.int32), P, S, dtype, gen)
