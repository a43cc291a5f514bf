"""The Triton rotary embedding against `rotary_ref`, on strided q/k views of a fused qkv buffer.

No transcendental and no reduction in the kernel (cos/sin come in as a table), and the same
rounding points as the reference, so q and k must match it bit for bit; the kernel must write
only q's and k's columns of the buffer, in place.
"""

from __future__ import annotations

import pytest
import torch

from fastllava.kernels.rotary import rope_cos_sin, rope_inv_freq, rotary, rotary_ref
from tolerances import assert_exact
from kernel_device import DEVICE

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
PAD = 5  # extra columns per token row of the fused buffer: token stride != (H + 2 KVH) D


def fused_qkv(gen, N, H, KVH, D, dtype):
    """(buffer, q, k): q (N, H, D) and k (N, KVH, D) are views of one padded qkv buffer."""
    width = (H + 2 * KVH) * D
    buf = (torch.randn(N, width + PAD, generator=gen) * 2).to(dtype).to(DEVICE)
    qkv = buf[:, :width].view(N, H + 2 * KVH, D)  # (N, H + 2 KVH, D), token stride width + PAD
    return buf, qkv[:, :H], qkv[:, H:H + KVH]


def check_in_place(N, H, KVH, D, dtype, cos, sin, gen):
    buf, q, k = fused_qkv(gen, N, H, KVH, D, dtype)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_ref(q_ref, k_ref, cos, sin)
    before = buf.clone()
    q_out, k_out = rotary(q, k, cos, sin)
    assert q_out is q and k_out is k, "rotary returns its (rotated in place) arguments"
    assert_exact(q, q_ref)
    assert_exact(k, k_ref)
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[:, :(H + KVH) * D] = False  # q and k columns; v and the padding must not change
    assert_exact(buf[untouched], before[untouched])
    # The rotated values live in the caller's buffer (same storage, not a copy).
    assert_exact(buf[:, :H * D].view(N, H, D), q_ref)
    assert_exact(buf[:, H * D:(H + KVH) * D].view(N, KVH, D), k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 72, 128, 8, 12])
@pytest.mark.parametrize("H,KVH", [(4, 4), (6, 2), (5, 1)])
def test_matches_ref_on_fused_qkv(dtype, D, H, KVH):
    gen = torch.Generator().manual_seed(D * 100 + H * 10 + KVH)
    N = 7
    positions = torch.tensor([0, 1, 2, 17, 511, 3000, 4095])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(D, 10000.0), dtype)
    check_in_place(N, H, KVH, D, dtype, cos.to(DEVICE), sin.to(DEVICE), gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tokens_large_positions(dtype):
    """113 tokens at random positions up to 32k with a large theta (Yi's 5e6), GQA 7/1."""
    gen = torch.Generator().manual_seed(3)
    N, H, KVH, D = 113, 7, 1, 128
    positions = torch.randint(0, 32768, (N,), generator=gen)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(D, 5e6), dtype)
    check_in_place(N, H, KVH, D, dtype, cos.to(DEVICE), sin.to(DEVICE), gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arbitrary_cos_sin_rows(dtype):
    """Random cos/sin whose two halves differ: the kernel must use cos[D/2:] and sin[D/2:] for
    the second half of each head (not reuse the first half), and honour the table's row stride."""
    gen = torch.Generator().manual_seed(4)
    N, H, KVH, D = 7, 3, 2, 72
    table = torch.randn(N, 3 * D, generator=gen).to(dtype).to(DEVICE)
    cos, sin = table[:, :D], table[:, 2 * D:]  # row stride 3D
    check_in_place(N, H, KVH, D, dtype, cos, sin, gen)


def test_bad_inputs_raise():
    N, H, KVH, D = 3, 4, 2, 16
    q = torch.randn(N, H, D, device=DEVICE)
    k = torch.randn(N, KVH, D, device=DEVICE)
    cs = torch.randn(N, D, device=DEVICE)
    cases = [
        ((q[0], k, cs, cs), "q must be 3-D"),
        ((q, k[:2], cs, cs), "k must be"),
        ((q, torch.randn(N, KVH, 8, device=DEVICE), cs, cs), "k must be"),
        ((q, k, cs[:2], cs[:2]), "cos and sin must be"),
        ((q, k, cs, cs.half()), "sin must be"),
        ((q, k.half(), cs, cs), "k must be"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, cs, cs), "contiguous in its last"),
        ((torch.randn(N, H, 7, device=DEVICE), torch.randn(N, KVH, 7, device=DEVICE),
          cs[:, :7], cs[:, :7]), "must be even"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rotary(*args)
