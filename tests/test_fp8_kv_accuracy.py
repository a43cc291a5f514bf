"""FP8 KV cache (kv_cache_dtype="fp8") accuracy on the non-degenerate tiny checkpoint (fp32, CPU),
measured and reported. Scales are 1.0 (engine/kv_cache.py, README "FP8").

1. Scale 1 fits: every K and V the unquantized model writes lies inside e4m3's ±448 (nothing
   saturates); the ranges and the share of subnormals are printed.
2. Per layer: decode attention over the quantized cache, fed the q and the cache the unquantized
   model really produces, stays within the bound derived from e4m3 rounding (`kv_error_bound`);
   ‖ô - o‖ / ‖o‖ per layer is printed.
3. The fp8-KV model equals its dequantized reference, the unquantized model with K and V
   replaced right after rotary by dequantize(quantize(.)) in an fp32 cache: bit for bit on the
   torch path, to attention rounding on the reference and (interpreted) Triton backends.
4. Logits of the fp8-KV model against the unquantized model stay within a stated relative error
   while their greedy tokens agree; agreement over the prompt set is printed (not required 100 %).
5. Prefix caching and chunked prefill keep working, with the same tokens as a cold, unchunked run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
# requests_ and rescaled are test_fp8_accuracy's fixtures (the same checkpoint and prompt set)
from test_fp8_accuracy import NEW_TOKENS, _generate, _report, requests_, rescaled  # noqa: F401
from tolerances import FP8_ETA, FP8_U, LOGITS_ATOL, assert_within

from fastllava import LLaVA
from fastllava.kernels.kv_cache_write import write_kv_ref
from fastllava.kernels.kv_quant import FP8_MAX, dequantize_kv_ref, quantize_kv_ref
from fastllava.runtime.config import RuntimeConfig

# ‖Δlogits‖ / ‖logits‖ per step while the greedy tokens agree: measured ≤ 2.1 % here (fp32, scale
# 1); the bound leaves 2.4x of that, an end-to-end regression check (test 2's is the derived one).
LOGITS_REL_BOUND = 0.05


def load(path, kv_cache_dtype="auto", backend="auto", **runtime) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", backend=backend,
                                 runtime=RuntimeConfig(kv_cache_dtype=kv_cache_dtype, **runtime))


@pytest.fixture(scope="module")
def models(rescaled):
    base, fp8 = load(rescaled), load(rescaled, "fp8")
    assert fp8.engine.runner.kv.k[0].dtype == torch.float8_e4m3fn
    yield base, fp8
    base.close()
    fp8.close()


def patch_op(llava: LLaVA, name: str, wrapper):
    """Route the engine's `name` op through wrapper(real, *args, **kwargs)."""
    runner = llava.engine.runner
    real = getattr(runner.ops, name)
    runner.ops = dataclasses.replace(runner.ops, **{name: lambda *a, **k: wrapper(real, *a, **k)})
    return real


def fake_quantize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return dequantize_kv_ref(quantize_kv_ref(x, scale), scale, x.dtype)


def test_scale_one_holds_every_cached_value(models, requests_, record_property,
                                            capsys):
    base, _ = models
    L = base.config.text.num_hidden_layers
    seen = {"k": [[] for _ in range(L)], "v": [[] for _ in range(L)]}
    calls = [0]

    def record(real, q, k, v, *args, **kw):
        out = real(q, k, v, *args, **kw)
        layer = calls[0] % L
        calls[0] += 1
        seen["k"][layer].append(k.detach().flatten().clone())
        seen["v"][layer].append(v.detach().flatten().clone())
        return out
    ops = base.engine.runner.ops
    patch_op(base, "rotary_write_kv", record)
    try:
        base.reset_prefix_cache()
        for r in requests_:
            base.generate_ids(dict(r, max_tokens=4))
    finally:
        base.engine.runner.ops = ops
    lines = ["K/V ranges the unquantized model writes (e4m3 at scale 1: normal |x| in "
             "[2^-6, 448]):"]
    for name in ("k", "v"):
        for layer, parts in enumerate(seen[name]):
            x = torch.cat(parts).abs()
            assert x.max() < FP8_MAX, f"{name} of layer {layer} saturates at scale 1: {x.max()}"
            sub = (x < 2 ** -6).double().mean().item()
            lines.append(f"  layer {layer} {name}: max |x| {x.max():.3g}, median {x.median():.3g}, "
                         f"subnormal {sub:.2%}")
    with capsys.disabled():
        _report(lines, record_property, "fp8_kv_max_abs", round(max(
            torch.cat(p).abs().max().item() for s in seen.values() for p in s), 3))


def kv_error_bound(q, k, v, scale, ks=1.0, vs=1.0) -> torch.Tensor:
    """|ô - o| elementwise for one decode row set, q (H, D), k/v (T, KVH, D) unquantized.

    Quantization moves each key element by <= u|k| + η ks and each value by <= u|v| + η vs
    (u = 2^-4, η = 2^-10). Score j moves by ε_j <= scale Σ_d |q_d| (u|k_jd| + η ks); with
    E = max_j ε_j every probability moves by a factor within e^{±2E}, so
    |ô_d - o_d| <= (e^{2E} - 1) Σ_j p_j |v̂_jd| + Σ_j p_j (u|v_jd| + η vs),
    with |v̂| <= (1+u)|v| + η vs."""
    H, KVH = q.shape[0], k.shape[1]
    qd = q.double().view(KVH, H // KVH, -1)                          # (KVH, G, D)
    kd, vd = k.double().transpose(0, 1), v.double().transpose(0, 1)   # (KVH, T, D)
    p = torch.softmax(torch.einsum("kgd,ktd->kgt", qd, kd) * scale, -1)
    eps = scale * torch.einsum("kgd,ktd->kgt", qd.abs(), FP8_U * kd.abs() + FP8_ETA * ks)
    grow = torch.expm1(2 * eps.amax(-1, keepdim=True))                 # (KVH, G, 1)
    moved = torch.einsum("kgt,ktd->kgd", p, (1 + FP8_U) * vd.abs() + FP8_ETA * vs)
    direct = torch.einsum("kgt,ktd->kgd", p, FP8_U * vd.abs() + FP8_ETA * vs)
    return (grow * moved + direct).reshape(H, -1)


def attend64(q, k, v, scale):
    H, KVH = q.shape[0], k.shape[1]
    qd = q.double().view(KVH, H // KVH, -1)
    p = torch.softmax(torch.einsum("kgd,tkd->kgt", qd, k.double()) * scale, -1)
    return torch.einsum("kgt,tkd->kgd", p, v.double()).reshape(H, -1)


def test_every_layer_within_the_fp8_kv_bound(models, requests_, record_property,
                                             capsys):
    base, _ = models
    L = base.config.text.num_hidden_layers
    worst, calls = [0.0] * L, [0]

    def check(real, q, k_cache, v_cache, tables, ctx, *, scale, **kw):
        layer = calls[0] % L
        calls[0] += 1
        S = k_cache.shape[1]
        for b in range(q.shape[0]):
            n = int(ctx[b])
            pages = tables[b, :-(-n // S)].long()
            k, v = (c[pages].flatten(0, 1)[:n].float() for c in (k_cache, v_cache))
            o = attend64(q[b], k, v, scale)
            o8 = attend64(q[b], fake_quantize(k), fake_quantize(v), scale)
            assert_within(o8, o, kv_error_bound(q[b], k, v, scale))
            worst[layer] = max(worst[layer], ((o8 - o).norm() / o.norm()).item())
        return real(q, k_cache, v_cache, tables, ctx, scale=scale, **kw)
    ops = base.engine.runner.ops
    patch_op(base, "paged_decode_attention", check)
    try:
        for r in requests_[:4]:
            base.generate_ids(dict(r, max_tokens=6))
    finally:
        base.engine.runner.ops = ops
    assert calls[0] >= 4 * 5 * L
    lines = ["FP8 KV per-layer decode attention relative error ‖ô - o‖/‖o‖ (fp64, scale 1):"]
    lines += [f"  layer {i}: {w:.4f}" for i, w in enumerate(worst)]
    with capsys.disabled():
        _report(lines, record_property, "fp8_kv_worst_layer_relative_error", round(max(worst), 5))
    assert max(worst) > 0   # it is quantized


def fake_quant_kv(real, q, k, v, positions, cos, sin, k_cache, v_cache, slots, **kw):
    """The dequantized reference's KV write: K/V fake-quantized after rotary, cached in fp32."""
    real(q, k, v, positions, cos, sin, k_cache, v_cache, slots, **kw)
    keep = slots >= 0
    k[keep], v[keep] = fake_quantize(k[keep]), fake_quantize(v[keep])
    write_kv_ref(k, v, k_cache, v_cache, slots)
    return q, k


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_equals_the_dequantized_reference(rescaled, requests_, backend):
    """The fp8-KV model on `backend` against the torch-path model whose fp32 cache holds the
    fake-quantized K/V: bit-identical on the torch path (the same values reach the same ops),
    within LOGITS_ATOL elsewhere (other attention rounding)."""
    fp8 = load(rescaled, "fp8", backend=backend)
    ref = load(rescaled)
    patch_op(ref, "rotary_write_kv", fake_quant_kv)
    try:
        for r in requests_[: 3 if backend == "torch" else 1]:
            r = dict(r, max_tokens=NEW_TOKENS if backend == "torch" else 4)
            (ids, logits), (ref_ids, ref_logits) = _generate(fp8, r), _generate(ref, r)
            assert ids == ref_ids
            if backend == "torch":
                assert torch.equal(logits, ref_logits)
            else:
                torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGITS_ATOL)
    finally:
        fp8.close()
        ref.close()


def test_logits_and_greedy_agreement(models, requests_, record_property, capsys):
    """While the greedy tokens agree, the logits of the fp8-KV model stay within
    LOGITS_REL_BOUND of the unquantized model's; agreement is reported. Even the first token may
    differ: the prefill attends over the quantized K/V of its own tokens too."""
    base, fp8 = models
    lines = [f"FP8 KV vs unquantized greedy agreement ({len(requests_)} prompts x {NEW_TOKENS} "
             "tokens, fp32 CPU, scale 1):"]
    same, first, worst = 0, 0, 0.0
    for r in requests_:
        (a, la), (b, lb) = _generate(base, r), _generate(fp8, r)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rel = ((lb[:n + 1] - la[:n + 1]).norm(dim=-1) / la[:n + 1].norm(dim=-1)).max().item()
        assert rel <= LOGITS_REL_BOUND, (r["prompt"], rel)
        worst, same, first = max(worst, rel), same + (a == b), first + (a[:1] == b[:1])
        lines.append(f"  {r['prompt'][:36]!r:40s} identical {a == b!s:5s} common prefix {n}, "
                     f"max logits rel. error {rel:.4f}")
    lines.append(f"  identical sequences {same}/{len(requests_)}, first token {first}/"
                 f"{len(requests_)}, worst logits rel. error {worst:.4f}")
    with capsys.disabled():
        _report(lines, record_property, "fp8_kv_greedy_identical", f"{same}/{len(requests_)}")
    record_property("fp8_kv_logits_rel_error", round(worst, 5))


def test_prefix_cache_and_chunked_prefill_keep_their_tokens(rescaled, requests_):
    """A warm prefix-cache hit and a prefill in 16-token chunks read quantized K/V where a cold,
    whole prefill computed them: the same tokens and logits to rounding, since the step's own
    K/V already hold their dequantized values (kernels/rotary_write_kv)."""
    cold = load(rescaled, "fp8", prefix_caching=False)
    chunked = load(rescaled, "fp8", max_num_batched_tokens=16, max_num_seqs=4,
                   max_prefill_tokens_while_decoding=16)
    try:
        for r in requests_[:3]:
            ids, logits = _generate(cold, r)
            hits = chunked.stats()["prefix_hit_tokens"]
            for run in range(2):   # the second run hits the prefix cache
                got, got_logits = _generate(chunked, r)
                assert got == ids, (r["prompt"], run)
                torch.testing.assert_close(got_logits, logits, rtol=0, atol=LOGITS_ATOL)
            assert chunked.stats()["prefix_hit_tokens"] > hits
    finally:
        cold.close()
        chunked.close()
