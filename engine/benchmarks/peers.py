"""transformers peers for the in-process benchmarks (transformers is not a runtime dependency:
it comes with the `test` extra, and a run that asks for a peer without it says so).

`hf_llama` builds transformers' LlamaForCausalLM from fastllava's text config with random
weights (a LLaVA decode after prefill is exactly the language model); `hf_latency` times one
request the way `bench latency` times fastllava: prefill of the prompt ids, then greedy steps,
each step synchronised (the engine reads every sampled token on the host too).
"""

from __future__ import annotations

import time

import torch

from fastllava.benchmarks.stats import Trace

PEERS = ("eager", "compiled")
LABELS = {"eager": "hf eager (DynamicCache)", "compiled": "hf compiled (StaticCache, reduce-overhead)"}


def hf_llama(t, device: str, dtype: torch.dtype):
    """transformers LlamaForCausalLM with fastllava's text config; weights by fill_random_ on the
    device (no fp32 host copy), RoPE buffers rebuilt after to_empty."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fastllava.weights.random import fill_random_

    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                      num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                      max_position_embeddings=t.max_position_embeddings,
                      rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                      attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = fill_random_(model.to(dtype).to_empty(device=device))
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return model.eval().requires_grad_(False), cfg

@torch.no_grad()   # as transformers' generate (cudagraph trees and inference_mode mix badly)
def hf_latency(model, cfg, prompts: list[list[int]], output_len: int, compiled: bool,
               device: str, warmup: int) -> list[Trace]:
    """One Trace per prompt (after `warmup` untimed ones): submit, each token's time, end."""
    from transformers import DynamicCache, StaticCache

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    forward = (torch.compile(model.forward, mode="reduce-overhead", dynamic=False) if compiled
               else model.forward)
    # One StaticCache, reset per request: the compiled graphs are recorded on its tensors.
    static = StaticCache(config=cfg, max_cache_len=max(map(len, prompts)) + output_len + 1) \
        if compiled else None
    traces = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        if static is not None:
            static.reset()
        cache = static if compiled else DynamicCache(config=cfg)
        sync()
        t = Trace(time.perf_counter())
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1:].argmax(-1)
        sync()
        t.events.append(time.perf_counter())
        for _ in range(output_len - 1):
            nxt = forward(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            nxt.item()   # the host reads the token, as a server must
            t.events.append(time.perf_counter())
        t.end, t.tokens = t.events[-1], output_len
        if i >= warmup:
            traces.append(t)
    return traces


def peer_latency(engine, peers: list[str], prompts: list[list[int]], output_len: int,
                 warmup: int) -> dict[str, list[Trace] | str]:
    """label → traces, or → the reason the peer did not run. Frees the fastllava engine first
    (both models at once would not fit a GPU at the 34B shapes)."""
    import gc

    device, text = engine.device, engine.config.text
    engine.close()
    gc.collect()
    out: dict[str, list[Trace] | str] = {}
    try:
        model, cfg = hf_llama(text, device, engine.dtype)
    except ImportError:
        return {LABELS[k]: "n/a: transformers is not installed (pip install transformers)"
                for k in peers}
    for kind in peers:
        if kind == "compiled" and device != "cuda":
            out[LABELS[kind]] = "n/a: CUDA graphs need a GPU"
            continue
        try:
            # compiled: >= 2 untimed requests cover compilation and CUDA-graph recording
            extra = max(0, 2 - warmup) if kind == "compiled" else 0
            out[LABELS[kind]] = hf_latency(model, cfg, prompts[:1] * extra + prompts, output_len,
                                           kind == "compiled", device, warmup + extra)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run reads n/a
            out[LABELS[kind]] = f"n/a: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        if kind == "compiled":
            torch._dynamo.reset()
    return out
