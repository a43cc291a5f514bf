"""Single-sequence generation over the paged cache: one prefill step, then decode steps.

This is the reference loop the runtime's continuous batching must reproduce token for token; it
builds the same ForwardContext a batched step would, with B = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from fastllava.kv_cache import PagedKVCache
from fastllava.models.context import ForwardContext
from fastllava.sampling import make_generator, sample


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: tuple[int, ...]


def _context(cache: PagedKVCache, block_table: list[int], start: int, end: int,
             is_prefill: bool, device) -> ForwardContext:
    i32 = dict(dtype=torch.int32, device=device)
    n = end - start
    return ForwardContext(
        is_prefill=is_prefill,
        positions=torch.arange(start, end, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(cache.slots(block_table, start, end), dtype=torch.int64,
                                  device=device),
        block_tables=torch.tensor([block_table], **i32),
        cu_seqlens=torch.tensor([0, n], **i32),
        prefix_lens=torch.tensor([start], **i32),
        context_lens=torch.tensor([end], **i32),
        logits_rows=torch.tensor([n - 1], dtype=torch.int64, device=device),
    )


@torch.inference_mode()
def generate_tokens(model, ops, cache: PagedKVCache, prompt_embeds: torch.Tensor,
                    params: SamplingParams) -> Iterator[int]:
    """Yield generated token ids (stop id included) until a stop id, max_tokens, or a full cache.
    Pages are returned to the cache when the generator finishes or is closed."""
    device = prompt_embeds.device
    prompt_len = prompt_embeds.shape[0]
    budget = min(params.max_tokens, cache.capacity_tokens - prompt_len)
    if budget <= 0:
        raise ValueError(f"the prompt has {prompt_len} tokens (image included); the KV cache "
                         f"holds at most {cache.capacity_tokens}")
    generator = make_generator(params.seed, device) if params.temperature > 0 else None
    block_table: list[int] = []
    try:
        cache.allocate(block_table, prompt_len)
        ctx = _context(cache, block_table, 0, prompt_len, True, device)
        logits = model(ops, prompt_embeds, ctx, cache)
        pos = prompt_len
        for step in range(budget):
            token = int(sample(logits, params.temperature, params.top_p, generator)[0])
            yield token
            if token in params.stop_ids or step == budget - 1:
                return
            cache.allocate(block_table, pos + 1)
            ctx = _context(cache, block_table, pos, pos + 1, False, device)
            ids = torch.tensor([token], dtype=torch.int64, device=device)
            logits = model(ops, model.embed(ids, None, None), ctx, cache)
            pos += 1
    finally:
        cache.free(block_table)
