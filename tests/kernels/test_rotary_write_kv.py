"""rotary_write_kv (rotary of q and k fused with the paged KV write) is bit-exact against its
reference, the unfused rotary_ref + write_kv_ref with cos/sin gathered from the tables.

Swept over shape x dtype: odd token counts, GQA ratios, head dims that are not powers of two,
tokens that cross page boundaries, padding slots (-1), int32/int64 indices, a cache dtype other
than the activations'. Both sides start from the same garbage-filled caches and the same fused qkv
buffer, so a stray store (a padding row written, v's columns touched, a wrong slot) is a mismatch.
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE
from tolerances import assert_exact

from fastllava.kernels.rotary import rope_cos_sin, rope_inv_freq
from fastllava.kernels.rotary_write_kv import rotary_write_kv, rotary_write_kv_ref

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
PAD = 5  # extra columns per token row of the fused buffer: token stride != (H + 2 KVH) D


def tables(L, D, dtype, theta=10000.0):
    cos, sin = rope_cos_sin(torch.arange(L), rope_inv_freq(D, theta), dtype)
    return cos.to(DEVICE), sin.to(DEVICE)


def run_both(N, H, KVH, D, dtype, *, S=16, L=4096, cache_dtype=None, index_dtype=torch.int64,
             theta=10000.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    P = max(6, -(-N // S) + 1)  # pages: room for every row, some left unwritten
    width = (H + 2 * KVH) * D
    buf = (torch.randn(N, width + PAD, generator=gen) * 2).to(dtype).to(DEVICE)
    ref_buf, original = buf.clone(), buf.clone()

    def views(b):
        qkv = b[:, :width].view(N, H + 2 * KVH, D)  # (N, H + 2 KVH, D), token stride width + PAD
        return qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:]

    # Distinct slots over the whole pool (so consecutive rows cross pages), rows 2, 5, 8... -1.
    slots = torch.randperm(P * S, generator=gen)[:N]
    slots[2::3] = -1
    positions = torch.randint(0, L, (N,), generator=gen)
    slots, positions = slots.to(index_dtype).to(DEVICE), positions.to(index_dtype).to(DEVICE)
    garbage = torch.randn(2, P, S, KVH, D, generator=gen).mul(1e3).to(cache_dtype).to(DEVICE)
    caches, ref_caches = garbage.clone(), garbage.clone()
    cos, sin = tables(L, D, dtype, theta)
    q, k, v = views(buf)
    out = rotary_write_kv(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    assert out[0] is q and out[1] is k, "rotated in place and returned"
    rotary_write_kv_ref(*views(ref_buf), positions, cos, sin, ref_caches[0], ref_caches[1], slots)
    assert_exact(buf, ref_buf)        # q and k rotated, v and the padding columns untouched
    assert_exact(caches, ref_caches)  # real rows landed in their slots, padding rows nowhere
    # The comparison only means something if rows were rotated and written: check one directly.
    row = min(1, N - 1)
    assert not torch.equal(q, views(original)[0]), "q was not rotated"
    slot = int(slots[row])
    assert torch.equal(caches[0].view(P * S, KVH, D)[slot], k[row].to(cache_dtype))
    assert torch.equal(caches[1].view(P * S, KVH, D)[slot], v[row].to(cache_dtype))
    return buf, caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [128, 64, 72, 12])
@pytest.mark.parametrize("H,KVH", [(4, 4), (6, 2), (7, 1)])
@pytest.mark.parametrize("N", [1, 7, 37])
def test_exact_against_ref(N, H, KVH, D, dtype):
    run_both(N, H, KVH, D, dtype, seed=N * 1000 + D * 10 + H)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_int32_indices_and_large_theta(index_dtype):
    """Yi's theta (5e6) at positions up to 32k, int32 positions and slots, GQA 7/1."""
    run_both(113, 7, 1, 128, torch.float16, L=32768, theta=5e6, index_dtype=index_dtype, seed=5)


def test_cache_dtype_differs_from_activations():
    """fp32 activations into an fp16 cache: the rotated k is rounded to the cache dtype once."""
    run_both(9, 4, 2, 64, torch.float32, cache_dtype=torch.float16, seed=6)


def test_rotary_matches_unfused_rotary_exactly():
    """The table row gathered in the kernel gives the same bits as rope_cos_sin per position."""
    from fastllava.kernels.rotary import rotary_ref
    N, H, KVH, D, L = 11, 4, 2, 64, 600
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(N, H, D, generator=gen).half().to(DEVICE)
    k = torch.randn(N, KVH, D, generator=gen).half().to(DEVICE)
    v = torch.randn(N, KVH, D, generator=gen).half().to(DEVICE)
    positions = torch.randint(0, L, (N,), generator=gen).to(DEVICE)
    cache = torch.zeros(2, 2, 16, KVH, D, dtype=torch.float16, device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_ref(q_ref, k_ref, *rope_cos_sin(positions, rope_inv_freq(D, 1e4).to(DEVICE),
                                           torch.float16))
    rotary_write_kv(q, k, v, positions, *tables(L, D, torch.float16), cache[0], cache[1],
                    torch.full((N,), -1, device=DEVICE))
    assert_exact(q, q_ref)
    assert_exact(k, k_ref)
    assert not cache.any(), "every slot was -1: nothing may be written"


def test_bad_inputs_raise():
    N, H, KVH, D = 3, 4, 2, 16
    q = torch.randn(N, H, D, device=DEVICE)
    k = torch.randn(N, KVH, D, device=DEVICE)
    v = torch.randn(N, KVH, D, device=DEVICE)
    cos, sin = tables(32, D, torch.float32)
    cache = torch.zeros(2, 16, KVH, D, device=DEVICE)
    pos = torch.arange(N, device=DEVICE)
    slots = torch.arange(N, device=DEVICE)
    ok = dict(q=q, k=k, v=v, positions=pos, cos_table=cos, sin_table=sin, k_cache=cache,
              v_cache=cache.clone(), slot_mapping=slots)
    cases = [
        (dict(positions=pos[:2]), "positions must be"),
        (dict(positions=pos.float()), "positions must be"),
        (dict(cos_table=cos[:, :8]), "cos and sin must be"),
        (dict(sin_table=sin.half()), "sin must be"),
        (dict(slot_mapping=slots[:2]), "slot_mapping must be"),
        (dict(v=v[:, :1]), "v must have"),
        (dict(k_cache=cache[..., :8]), "k_cache must be"),
        (dict(q=q[0]), "q must be 3-D"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            rotary_write_kv(**{**ok, **change})
