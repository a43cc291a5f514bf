"""The per-step forward context: everything the decoder needs besides token ids and weights.

Built once per step by the caller from its sequences (the sequence is the source of truth) and
passed explicitly down the model; nothing reads a global. N = tokens in the step, B = sequences.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ForwardContext:
    is_prefill: bool
    positions: torch.Tensor        # (N,) int64, absolute position of every token in the step
    slot_mapping: torch.Tensor     # (N,) int64, KV-cache slot of every token (-1 = padding)
    block_tables: torch.Tensor     # (B, max_pages) int32, page ids per sequence
    cu_seqlens: torch.Tensor       # (B+1,) int32, prefill: new-token offsets per sequence
    prefix_lens: torch.Tensor      # (B,) int32, prefill: tokens already cached before this step
    context_lens: torch.Tensor     # (B,) int32, decode: cached tokens incl. the new one
    logits_rows: torch.Tensor      # (B,) int64, rows of the step whose logits are wanted
    # prefill: some prefix_lens > 0. Known on the host from the sequences (reading prefix_lens
    # would sync); False runs the prefill attention variant without the cached-prefix loop.
    has_prefix: bool = True
    # prefill: sequences 0..decode_rows-1 are 1-token chunks over a cached prefix (decodes riding
    # a mixed step), from the host's lists; the Triton backend runs them as decode rows.
    decode_rows: int = 0
