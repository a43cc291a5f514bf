"""bench/decode.py's transformers peer rows: LlamaForCausalLM of the same text config (a LLaVA
decode step after prefill is exactly the language model), random weights, sdpa; eager with a
DynamicCache, and compiled (StaticCache + torch.compile(mode="reduce-overhead"), GPU only)."""

from __future__ import annotations

import torch

from decode_plan import HF_COMPILED, HF_EAGER, Plan, Row, free_memory, time_steps

from fastllava.benchmarks.peers import hf_llama


@torch.no_grad()   # as transformers' generate (cudagraph trees and inference_mode mix badly)
def hf_batch(model, cfg, B: int, plan: Plan, compiled: bool) -> Row:
    """Prefill B random prompts eagerly, then time greedy decode steps (argmax fed back)."""
    from transformers import DynamicCache, StaticCache

    gen = torch.Generator(device=plan.device).manual_seed(B)
    ids = torch.randint(cfg.vocab_size, (B, plan.context), generator=gen, device=plan.device)
    cache = (StaticCache(config=cfg, max_cache_len=plan.max_len) if compiled
             else DynamicCache(config=cfg))
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    forward = (torch.compile(model.forward, mode="reduce-overhead", dynamic=False) if compiled
               else model.forward)
    state = [out.logits[:, -1:].argmax(-1)]

    def step() -> None:
        logits = forward(input_ids=state[0], past_key_values=cache, use_cache=True).logits
        state[0] = logits[:, -1:].argmax(-1)

    warmup = max(plan.warmup, 4) if compiled else plan.warmup   # compile + cudagraph recording
    for _ in range(warmup):
        step()
    ctx = plan.context + 1 + warmup + (plan.timed - 1) / 2
    return Row(HF_COMPILED if compiled else HF_EAGER, B, ctx, time_steps(step, plan))


def hf_rows(t, plan: Plan, batches: list[int]) -> list[Row]:
    """The transformers peers at each batch size; a peer that cannot run gets an n/a row."""
    runnable = {k for k in plan.peers if k == "eager" or plan.device == "cuda"}
    model, cfg = hf_llama(t, plan.device, plan.dtype) if runnable and batches else (None, None)
    rows: list[Row] = []
    for kind, impl in (("eager", HF_EAGER), ("compiled", HF_COMPILED)):
        for B in batches:
            if kind not in plan.peers:
                rows.append(Row(impl, B, note="n/a: not asked for (--peers)"))
            elif kind not in runnable:
                rows.append(Row(impl, B, note="n/a: CUDA graphs need a GPU (--smoke runs eager)"))
            else:
                try:
                    rows.append(hf_batch(model, cfg, B, plan, compiled=kind == "compiled"))
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run reads n/a
                    rows.append(Row(impl, B, note=f"n/a: {type(exc).__name__}: "
                                                  f"{' '.join(str(exc).split())[:160]}"))
                if kind == "compiled":
                    torch._dynamo.reset()   # drop this batch's graphs (and their memory pool)
                free_memory(plan.device)
    del model
    free_memory(plan.device)
    return rows
