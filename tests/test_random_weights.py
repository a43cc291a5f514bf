"""fastllava.weights.random: real configs parse to the documented shapes, parameter counts at the
real sizes (counted on the meta device), random models shaped like loaded checkpoints, seeded,
and finite through the vision tower, projector and decoder."""

from __future__ import annotations

import pytest
import torch

from fastllava.config import load_config
from fastllava.kernels.ops import get_ops
from fastllava.kv_cache import KVCache
from fastllava.models.context import ForwardContext
from fastllava.weights.random import (INIT_STD, REAL_CONFIGS, count_parameters, fill_random_,
                                      random_model, real_config)


def text_params(t) -> int:
    """Decoder + lm_head parameters from the config alone (independent of the module code)."""
    h, q, kv, i = t.hidden_size, t.q_size, t.kv_size, t.intermediate_size
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h        # qkv, o, gate/up/down, 2 norms
    return 2 * t.vocab_size * h + t.num_hidden_layers * layer + h  # embed, lm_head, final norm


# performance.md: 13B "13.0 B params" (decoder alone), 34B "34.4 B params" (decoder alone);
# with the CLIP tower (23 of 24 layers run) and the projector they land inside these ranges.
@pytest.mark.parametrize("name,lo,hi,text_lo,text_hi", [
    ("llava-1.5-13b", 13.0e9, 13.4e9, 12.9e9, 13.1e9),
    ("llava-v1.6-34b", 34.4e9, 34.8e9, 34.3e9, 34.5e9),
])
def test_real_parameter_counts(name, lo, hi, text_lo, text_hi):
    config = real_config(name)
    total = count_parameters(config)
    text = text_params(config.text)
    print(f"{name}: {total:,} parameters ({text:,} in the decoder + lm_head)")
    assert lo <= total <= hi, f"{name}: {total:,} parameters, expected within [{lo:.3g}, {hi:.3g}]"
    assert text_lo <= text <= text_hi, \
        f"{name}: decoder {text:,} outside [{text_lo:.3g}, {text_hi:.3g}]"
    v = config.vision
    tower = (v.hidden_size * 3 * v.patch_size ** 2 + v.hidden_size            # conv, class emb
             + v.num_positions * v.hidden_size + 2 * v.hidden_size            # positions, pre-LN
             + config.num_vision_layers_run * (4 * v.hidden_size ** 2 + 4 * v.hidden_size
                                               + 2 * v.hidden_size * v.intermediate_size
                                               + v.intermediate_size + v.hidden_size
                                               + 4 * v.hidden_size))          # attn, mlp, 2 LNs
    h = config.text.hidden_size
    projector = config.vision_feature_size * h + h + h * h + h
    newline = h if config.kind == "next" else 0
    assert total == text + tower + projector + newline, \
        f"{name}: module count {total:,} != formula {text + tower + projector + newline:,}"


def test_real_configs_parse_to_the_documented_shapes():
    c13 = real_config("llava-1.5-13b")
    t = c13.text
    assert (c13.kind, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.intermediate_size, t.vocab_size,
            t.rope_theta, c13.image_token_id) == ("llava", 5120, 40, 40, 40, 128, 13824, 32064,
                                                  10000.0, 32000), c13
    c34 = real_config("llava-v1.6-34b")
    t = c34.text
    assert (c34.kind, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.intermediate_size, t.vocab_size,
            t.rope_theta, c34.image_token_id) == ("next", 7168, 60, 56, 8, 128, 20480, 64064,
                                                  5e6, 64000), c34
    assert c34.pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    for c in (c13, c34):
        v = c.vision
        assert (v.kind, v.hidden_size, v.num_hidden_layers, v.num_attention_heads,
                v.intermediate_size, v.image_size, v.patch_size, v.hidden_act) == \
            ("clip", 1024, 24, 16, 4096, 336, 14, "quick_gelu"), v
        assert c.vision_feature_layers == (-2,) and c.num_vision_layers_run == 23
        assert c.tokens_per_tile == 576
    mistral = real_config("llava-v1.6-mistral-7b").text
    assert (mistral.model_type, mistral.num_key_value_heads, mistral.rope_theta) == \
        ("mistral", 8, 1e6), mistral
    assert set(REAL_CONFIGS) >= {"llava-1.5-13b", "llava-v1.6-34b"}
    with pytest.raises(KeyError, match="llava-1.5-13b"):
        real_config("llava-2-70b")


def test_random_model_has_the_loaded_checkpoints_parameters(tiny_next):
    from fastllava import LLaVA

    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype=torch.float32, backend="torch")
    try:
        loaded = {n: (tuple(p.shape), p.dtype) for n, p in llava.model.named_parameters()}
        loaded_buffers = dict(llava.model.named_buffers())
    finally:
        llava.close()
    model = random_model(load_config(tiny_next), "cpu", torch.float32)
    got = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    missing, extra = sorted(loaded.keys() - got.keys()), sorted(got.keys() - loaded.keys())
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    bad = [(n, got[n], loaded[n]) for n in loaded if got[n] != loaded[n]]
    assert not bad, f"{len(bad)} parameters differ in shape/dtype, first: {bad[0]}"
    buffers = dict(model.named_buffers())
    assert buffers.keys() == loaded_buffers.keys()
    for name, b in loaded_buffers.items():   # RoPE inv_freq recomputed after to_empty
        torch.testing.assert_close(buffers[name], b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_init_rules_and_seeding(tiny_next, dtype):
    config = load_config(tiny_next)
    a, b = random_model(config, "cpu", dtype), random_model(config, "cpu", dtype)
    other = random_model(config, "cpu", dtype, seed=1)
    params = dict(a.named_parameters())
    assert all(p.dtype == dtype and not p.requires_grad for p in params.values())
    unequal = [n for n, p in b.named_parameters() if not torch.equal(p, params[n])]
    assert not unequal, f"same seed, {len(unequal)} parameters differ, first {unequal[0]}"
    random_names = [n for n, p in params.items() if not n.endswith("bias") and p.ndim >= 1
                    and "norm" not in n and "layer_norm" not in n and "pre_layrnorm" not in n]
    same = [n for n, p in other.named_parameters()
            if n in random_names and torch.equal(p, params[n])]
    assert not same, f"seed 1 gave the same values as seed 0 for {same[:5]}"
    for name, p in params.items():
        if name.endswith("bias"):
            assert not p.any(), f"{name}: bias not zero, max {p.abs().max()}"
        elif "norm" in name or "pre_layrnorm" in name:
            assert (p == 1).all(), f"{name}: norm weight not 1: {p.flatten()[:4].tolist()}"
    big = [n for n in random_names if params[n].numel() >= 4096]
    assert big, "no large random tensor to check the scale on"
    for name in big:
        std = params[name].float().std().item()
        assert 0.8 * INIT_STD < std < 1.2 * INIT_STD, f"{name}: std {std:.4f}, want {INIT_STD}"


def test_fill_random_refuses_meta_tensors():
    with torch.device("meta"):
        layer = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        fill_random_(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_gives_finite_features_and_logits(tiny_next, dtype):
    config = load_config(tiny_next)
    model = random_model(config, "cpu", dtype, seed=3)
    ops = get_ops("torch")
    t, s = config.text, config.vision.image_size
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        pixels = torch.randn(3, 3, s, s, generator=gen)         # base tile + a 1x2 grid
        feats = model.encode_images(ops, [pixels], [(s, 2 * s)], [(1, 2)])[0]
        assert feats.shape[-1] == t.hidden_size and torch.isfinite(feats).all(), feats
        T, S = 37, 16
        pages = -(-T // S)
        kv = KVCache(t.num_hidden_layers, pages, S, t.num_key_value_heads, t.head_dim, dtype, "cpu")
        i32, i64 = torch.int32, torch.int64
        ctx = ForwardContext(
            is_prefill=True, positions=torch.arange(T), slot_mapping=torch.arange(T),
            block_tables=torch.arange(pages, dtype=i32)[None],
            cu_seqlens=torch.tensor([0, T], dtype=i32),
            prefix_lens=torch.zeros(1, dtype=i32), context_lens=torch.tensor([T], dtype=i32),
            logits_rows=torch.tensor([T - 1], dtype=i64))
        ids = torch.randint(0, t.vocab_size, (T,), generator=gen)
        logits = model(ops, model.embed(ids, None, None), ctx, kv)
    assert logits.shape == (1, t.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all(), f"non-finite logits: {logits}"
    assert logits.std() > 0.1, f"degenerate logits (std {logits.std():.3g}): {logits[0, :8]}"
