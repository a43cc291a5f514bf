"""One step's inputs, packed so the workers get them once per step (not per layer).

Rank 0's model runner builds the step as usual (ids, image mask and features, ForwardContext);
`StepProxy` stands in for the model there: its `embed` only records its arguments, and the
forward call broadcasts them as one descriptor before every rank runs embed + decoder + lm_head:

    header  (ctrl group, CPU)  int64[10]: op, is_prefill, N, B, W (block-table width),
                               L (logits rows), F (image-feature rows), hidden, has_prefix,
                               decode_rows (the context's host-known kernel choices)
    ints    (step group)       int64: ids (N), image mask (N, when F), positions (N), slots (N),
                               block tables (B*W), cu_seqlens (B+1), prefix_lens (B),
                               context_lens (B), logits_rows (L)
    feats   (step group)       (F, hidden) model dtype, only when the step carries image rows

Decode steps replayed from the padded static buffers (runtime/tp_graphs.py) send only a header
naming the bucket (OP_DECODE); their inputs travel inside the replayed step itself.
"""

from __future__ import annotations

import dataclasses

import torch

from fastllava.models.context import ForwardContext

OP_STEP, OP_SETUP, OP_STOP, OP_GRAPHS, OP_DECODE, OP_MEASURE = 1, 2, 3, 4, 5, 6
HEADER_LEN = 10


@dataclasses.dataclass
class StepInputs:
    ids: torch.Tensor                    # (N,) int64
    image_mask: torch.Tensor | None      # (N,) bool, None when the step has no image rows
    features: torch.Tensor | None        # (F, hidden)
    ctx: ForwardContext


def header(op: int, *values: int) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0] = op
    h[1:1 + len(values)] = torch.tensor(values, dtype=torch.int64)
    return h


def send(comm, step: StepInputs) -> None:
    """Rank 0: broadcast the step (header, ints, features)."""
    c, feats = step.ctx, step.features
    B, W = c.block_tables.shape
    F = 0 if feats is None else feats.shape[0]
    hidden = 0 if feats is None else feats.shape[1]
    comm.broadcast_header(header(OP_STEP, int(c.is_prefill), step.ids.shape[0], B, W,
                                 c.logits_rows.shape[0], F, hidden, int(c.has_prefix),
                                 c.decode_rows))
    parts = [step.ids] + ([step.image_mask] if F else []) + [
        c.positions, c.slot_mapping, c.block_tables.flatten(), c.cu_seqlens, c.prefix_lens,
        c.context_lens, c.logits_rows]
    comm.broadcast(torch.cat([p.to(torch.int64) for p in parts]))
    if F:
        comm.broadcast(feats.contiguous())


def receive(comm, h: torch.Tensor, device: torch.device, dtype: torch.dtype) -> StepInputs:
    """Workers: the rest of a step whose header `h` has arrived."""
    _, is_prefill, N, B, W, L, F, hidden, has_prefix, decode_rows = h.tolist()
    sizes = [N] + ([N] if F else []) + [N, N, B * W, B + 1, B, B, L]
    ints = comm.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=device))
    parts = list(ints.split(sizes))
    ids = parts.pop(0)
    mask = parts.pop(0).bool() if F else None
    positions, slots, tables, cu, prefix, context, rows = parts
    i32 = torch.int32
    ctx = ForwardContext(is_prefill=bool(is_prefill), positions=positions, slot_mapping=slots,
                         block_tables=tables.reshape(B, W).to(i32), cu_seqlens=cu.to(i32),
                         prefix_lens=prefix.to(i32), context_lens=context.to(i32),
                         logits_rows=rows, has_prefix=bool(has_prefix), decode_rows=decode_rows)
    feats = comm.broadcast(torch.empty(F, hidden, dtype=dtype, device=device)) if F else None
    return StepInputs(ids, mask, feats, ctx)


def run(model, ops, step: StepInputs, kv) -> torch.Tensor:
    """Every rank: embed (vocab-parallel) + decoder + lm_head → logits (B, V) on every rank."""
    embeds = model.embed(step.ids, step.image_mask, step.features)
    return model(ops, embeds, step.ctx, kv)


class _Recorded:
    """What the runner asked `embed` for; the embedding itself runs in the forward call."""

    def __init__(self, ids, image_mask, features):
        self.ids, self.image_mask, self.features = ids, image_mask, features


class StepProxy:
    """Rank 0's stand-in for the model inside the ModelRunner (the one hook: the runner's
    `model.embed(...)` + `model(ops, embeds, ctx, kv)`). Everything else (encode_images,
    config, parameters) is the real model's: the tower runs on rank 0 only."""

    def __init__(self, model, driver):
        self.shard, self._driver = model, driver    # shard: this rank's real model

    def __getattr__(self, name):
        return getattr(self.shard, name)

    def embed(self, ids, image_mask, features):
        return _Recorded(ids, image_mask, features)

    def __call__(self, ops, embeds: _Recorded, ctx: ForwardContext, kv) -> torch.Tensor:
        step = StepInputs(embeds.ids, embeds.image_mask, embeds.features, ctx)

        def with_every_rank(comm) -> torch.Tensor:
            send(comm, step)
            return run(self.shard, ops, step, kv)
        return self._driver.step(with_every_rank, kv)
