"""How many Triton kernels a decoder layer launches, and which prefill variant a step picks.

Per decode layer: RMSNorm, rotary + KV write (one fused kernel, cos/sin gathered from the
per-position table), split-K attention, its merge (only when the context needs more than one
split), RMSNorm, SiLU-and-mul: 6 launches (5 with a single split), plus the 4 GEMMs in torch.
Before the fusion it was 7 (separate rotary and KV write), and 7 torch ops per step rebuilt
cos/sin. Counted by wrapping every kernel's `run` (what a launch calls) on the real model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import pytest
import torch
from specialization import all_kernels
from torch.utils._python_dispatch import TorchDispatchMode

from fastllava.kernels.ops import TRITON_OPS
from fastllava.kernels.paged_decode_attention import choose_num_splits
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.dummy_step import DummySteps
from fastllava.weights.random import TINY_CONFIG, llava_config, random_model

pytestmark = pytest.mark.interpreter

LAYERS = 3
PER_LAYER_MULTI_SPLIT = {"_rms_norm_kernel": 2, "_rotary_write_kv_kernel": 1,
                         "_decode_split_kernel": 1, "_decode_merge_kernel": 1,
                         "_silu_and_mul_kernel": 1}


@contextlib.contextmanager
def launches():
    """Counter of kernel name -> launches, and the constexpr HAS_PREFIX of each prefill launch."""
    counts, has_prefix, saved = collections.Counter(), [], []
    for kernel in all_kernels():
        real = kernel.run

        def run(*args, grid, warmup, kernel=kernel, real=real, **kwargs):
            counts[kernel.fn.__name__] += 1
            if "HAS_PREFIX" in kwargs:
                has_prefix.append(kwargs["HAS_PREFIX"])
            return real(*args, grid=grid, warmup=warmup, **kwargs)
        saved.append((kernel, real))
        kernel.run = run
    try:
        yield counts, has_prefix
    finally:
        for kernel, real in saved:
            kernel.run = real


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def steps():
    cfg = llava_config(TINY_CONFIG)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=LAYERS))
    model = random_model(cfg, "cpu", torch.float32)
    rc = RuntimeConfig(max_num_seqs=2, max_num_batched_tokens=64, max_context=1024,
                       page_size=16)
    return DummySteps(model, TRITON_OPS, rc, torch.float32, "cpu")


def test_decode_layer_launches_six_kernels_with_splits_five_without(steps):
    kv = steps.scratch_kv()
    text = steps.config.text
    for context, merges in ((600, True), (5, False)):
        width = -(-context // kv.page_size) * kv.page_size
        assert (choose_num_splits(1, text.num_key_value_heads, width) > 1) == merges
        with launches() as (counts, _), torch.inference_mode(), AtenOps() as aten:
            steps.decode(kv, 1, context)
        want = {name: n * LAYERS for name, n in PER_LAYER_MULTI_SPLIT.items()}
        want["_rms_norm_kernel"] += 1                       # the final norm
        if not merges:
            del want["_decode_merge_kernel"]
        assert dict(counts) == want, f"context {context}: launched {dict(counts)}"
        per_layer = (sum(counts.values()) - 1) / LAYERS
        assert per_layer == (6 if merges else 5)
        # cos/sin come from the table built at load: nothing trigonometric runs per step.
        assert not {"cos", "sin", "cat"} & set(aten.names), dict(aten.names)


def test_prefill_picks_the_no_prefix_variant_unless_a_prefix_is_cached(steps):
    kv = steps.scratch_kv()
    for prefix, want in ((0, False), (17, True)):
        with launches() as (counts, has_prefix), torch.inference_mode():
            steps.prefill(kv, 9, 2, prefix=prefix)
        assert has_prefix == [want] * LAYERS, f"prefix {prefix}: HAS_PREFIX {has_prefix}"
        assert counts["_rotary_write_kv_kernel"] == LAYERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_is_built_at_load_in_the_model_dtype(dtype):
    """Built on the meta device, cast, allocated, then filled (as the loader does): every row has
    the bits transformers' per-step computation gives at that position (fp32 math, one cast)."""
    from fastllava.kernels.rotary import rope_cos_sin, rope_inv_freq
    cfg = llava_config(TINY_CONFIG)
    rope = random_model(cfg, "cpu", dtype).language_model.rope
    t = cfg.text
    assert rope.cos.shape == (t.max_position_embeddings, t.head_dim) and rope.cos.dtype == dtype
    positions = torch.tensor([0, 1, 17, 511, t.max_position_embeddings - 1])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(t.head_dim, t.rope_theta), dtype)
    assert torch.equal(rope.cos[positions], cos) and torch.equal(rope.sin[positions], sin)
