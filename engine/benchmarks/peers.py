"""transformers peers for the in-process benchmarks (transformers is not a runtime dependency:
it comes with the `test` extra, and a run that asks for a peer without it says so).

`hf_llama` builds transformers' LlamaForCausalLM from fastllava's text config with random
weights (a LLaVA decode after prefill is exactly the language model); `hf_latency` times one
request the way `bench latency` times fastllava: prefill of the prompt ids, then greedy steps,
each step synchronised (the engine reads every sampled token on the host too). `hf_throughput`
runs `bench throughput`'s batch as a transformers user would: `generate` on batches of
`batch_size` left-padded prompts, in order, greedy, exactly output_len tokens (no eos).
"""

from __future__ import annotations

import time

import torch

from fastllava.benchmarks.stats import Trace

PEERS = ("eager", "compiled")
LABELS = {"eager": "hf eager (DynamicCache)", "compiled": "hf compiled (StaticCache, reduce-overhead)"}
NO_GPU = "n/a: CUDA graphs need a GPU"


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


@torch.no_grad()
def hf_throughput(model, prompts: list[list[int]], output_len: int, batch_size: int,
                  compiled: bool, device: str, bar=None) -> list[Trace]:
    """One Trace per prompt, all submitted at the start: `generate` on batches of `batch_size`
    in order; a token's time is when its step reached the host (generate's streamer call).
    compiled: one StaticCache per batch size, reset per batch, and generate's own
    torch.compile(mode="reduce-overhead") of the decode step; every batch shape is warmed up
    first (compilation and CUDA-graph recording stay out of the timed run)."""
    from transformers import CompileConfig, GenerationConfig, StaticCache
    from transformers.generation.streamers import BaseStreamer

    class TokenTimes(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []   # [0]: the prompt, then one per generated token

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    compile_config = CompileConfig(mode="reduce-overhead", dynamic=False) if compiled else None
    caches: dict[int, object] = {}
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

    def generate(batch: list[list[int]], new_tokens: int, streamer=None):
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        cache = None
        if compiled:   # one cache per shape: the recorded graphs hold its tensors' addresses
            if len(batch) not in caches:
                caches[len(batch)] = StaticCache(config=model.config,
                                                 max_cache_len=max(map(len, prompts)) + output_len)
            cache = caches[len(batch)]
            cache.reset()
        gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                               pad_token_id=0, disable_compile=not compiled,
                               compile_config=compile_config)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             past_key_values=cache, streamer=streamer)
        return out.shape[1] - width

    for first in {len(b): b for b in batches}.values():   # warm-up, one batch of each size
        generate(first, min(output_len, 4))
    t0, traces = time.perf_counter(), []
    for batch in batches:
        step = TokenTimes()
        got = generate(batch, output_len, step)
        for _ in batch:
            t = Trace(t0, step.times[1:], step.times[-1], len(step.times) - 1)
            t.error = "" if got == output_len else f"generated {got} tokens, not {output_len}"
            traces.append(t)
        if bar is not None:
            bar.update(len(batch))
    return traces


def _each_peer(engine, peers: list[str], run_one) -> dict[str, object]:
    """label → run_one(model, cfg, kind), or → the reason the peer did not run. Frees the
    fastllava engine first (both models at once would not fit a GPU at the 34B shapes)."""
    import gc

    device, text = engine.device, engine.config.text
    engine.close()
    gc.collect()
    out: dict[str, object] = {}
    try:
        model, cfg = hf_llama(text, device, engine.dtype)
    except ImportError:
        return {LABELS[k]: "n/a: transformers is not installed (pip install transformers)"
                for k in peers}
    for kind in peers:
        if kind == "compiled" and device != "cuda":
            out[LABELS[kind]] = NO_GPU
            continue
        try:
            out[LABELS[kind]] = run_one(model, cfg, kind)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run reads n/a
            out[LABELS[kind]] = f"n/a: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        if kind == "compiled":
            torch._dynamo.reset()
    return out


def peer_latency(engine, peers: list[str], prompts: list[list[int]], output_len: int,
                 warmup: int) -> dict[str, list[Trace] | str]:
    """label → traces of `hf_latency` (after `warmup` untimed requests), or → why not."""
    def one(model, cfg, kind: str) -> list[Trace]:
        # compiled: >= 2 untimed requests cover compilation and CUDA-graph recording
        extra = max(0, 2 - warmup) if kind == "compiled" else 0
        return hf_latency(model, cfg, prompts[:1] * extra + prompts, output_len,
                          kind == "compiled", engine.device, warmup + extra)
    return _each_peer(engine, peers, one)


def peer_throughput(engine, peers: list[str], prompts: list[list[int]], output_len: int,
                    batch_size: int, bar_for=None) -> dict[str, list[Trace] | str]:
    """label → traces of `hf_throughput`, or → why not. bar_for(label): a progress bar or None."""
    def one(model, cfg, kind: str) -> list[Trace]:
        bar = bar_for(LABELS[kind]) if bar_for else None
        try:
            return hf_throughput(model, prompts, output_len, batch_size, kind == "compiled",
                                 engine.device, bar)
        finally:
            if bar is not None:
                bar.close()
    return _each_peer(engine, peers, one)
