"""Next-token choice from fp32 logits (B, V).

- temperature == 0: greedy argmax; ties go to the lowest id (torch.argmax returns the first max),
  as transformers' greedy search does.
- otherwise: logits / temperature, then top-p (transformers' TopPLogitsWarper: sort ascending,
  softmax, cumsum, drop tokens whose cumulative mass is <= 1 - top_p, always keep the most likely),
  then softmax + multinomial from a per-request torch.Generator (reproducible with a seed).
  No top-k: the fal schema exposes none (transformers would add top_k=50 by default).
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 → token ids (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
