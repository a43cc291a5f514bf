"""Per-step integers never pick a new compiled variant: a server must not compile mid-traffic.

Triton compiles one variant per specialization key: every int argument that equals 1 or is a
multiple of 16 (and every pointer's 16-byte alignment) is part of it unless the kernel marks the
argument `do_not_specialize`. The batch size, the block-table width and the token count change
from step to step, so each launcher below is called with many of them; the arguments it passes
are keyed by Triton's own binder for a Hopper target (specialization.py). One key per launcher
variant is the proof. The GPU test in
tests/runtime/test_warmup_gpu.py counts real compilations after the engine's warm-up.
"""

from __future__ import annotations

import pytest
import torch
from specialization import recording

from fastllava.kernels import gelu, paged_decode_attention, prefill_attention


def keys(kernel, launches) -> set[str]:
    """The specialization keys of `kernel` over the launches `launches()` makes (no kernel runs)."""
    found: set[str] = set()
    with recording(found, launch=False):
        launches()
    mine = {k for k in found if k.startswith(kernel.fn.__name__ + "(")}
    assert mine, "the launcher never reached the kernel"
    return mine


def fused_qkv(N, H, KVH, D):
    t = torch.randn(N, (H + 2 * KVH) * D, dtype=torch.bfloat16)
    q, k, v = t.split((H * D, KVH * D, KVH * D), dim=-1)
    return q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D)


STEPS = [1, 2, 3, 16, 17, 32, 48]   # sequences per step: 1, odd, multiples of 16


@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_one_variant_for_every_batch_and_table_width(with_prefix):
    H, KVH, D, S = 8, 2, 64, 16
    cache = torch.zeros(64, S, KVH, D, dtype=torch.bfloat16)

    def launches():
        for B in STEPS:
            lens = [(7 * b) % 23 + 1 for b in range(B)]
            q, k, v = fused_qkv(sum(lens), H, KVH, D)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
            extra = {}
            if with_prefix:
                width = B + 15                          # a table as wide as the longest prefix
                extra = dict(k_cache=cache, v_cache=cache,
                             block_tables=torch.zeros(B, width, dtype=torch.int32),
                             prefix_lens=torch.ones(B, dtype=torch.int32))
            prefill_attention.prefill_attention(q, k, v, cu, causal=True, scale=0.1, **extra)

    assert len(keys(prefill_attention._prefill_attention_kernel, launches)) == 1


def test_vision_tower_one_variant_for_every_tile_count():
    def launches():
        for tiles in (1, 2, 3, 5, 16, 17):
            q, k, v = fused_qkv(tiles * 577, 4, 4, 64)
            cu = torch.arange(0, (tiles + 1) * 577, 577, dtype=torch.int32)
            prefill_attention.prefill_attention(q, k, v, cu, causal=False, scale=0.125)

    assert len(keys(prefill_attention._prefill_attention_kernel, launches)) == 1


def test_gelu_one_variant_for_every_token_count():
    def launches():
        for n in (1, 577, 1154, 2885, 16):
            gelu.gelu(torch.randn(n, 48, dtype=torch.bfloat16), "quick")

    assert len(keys(gelu._gelu_kernel, launches)) == 1


def test_decode_two_variants_at_most_for_every_batch_and_width():
    """Without CUDA graphs the table is as wide as the longest sequence of the step and the split
    count follows the shapes: still only the one-split and the split + merge builds."""
    H, KVH, D, S = 8, 2, 64, 16
    cache = torch.zeros(600, S, KVH, D, dtype=torch.bfloat16)
    mod = paged_decode_attention

    def launches():
        for B in STEPS + [64]:
            for width in (1, 7, 16, 33, 512):
                q = fused_qkv(B, H, KVH, D)[0]
                tables = torch.zeros(B, width, dtype=torch.int32)
                mod.paged_decode_attention(q, cache, cache, tables,
                                           torch.ones(B, dtype=torch.int32), scale=0.1)

    merge = keys(mod._decode_merge_kernel, launches)
    assert len(merge) == 1, merge
    split = keys(mod._decode_split_kernel, launches)
    assert len(split) == 2, split                     # SINGLE_SPLIT True / False
