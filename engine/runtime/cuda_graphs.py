"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket.

A decode step of a 13B model is ~400 kernel launches; at batch 1 the launch overhead alone would
eat most of a 7.7 ms token. Each bucket (1, 2, 4, 8, then steps of 16 up to max_batch_size) is
captured once, largest first, into one shared memory pool (smaller graphs reuse the largest one's
activations). Inputs go through static buffers; a batch of B < bucket rows is padded with rows
whose KV slot is -1 (the KV-write kernel skips them) and whose context length is 0 (paged decode
returns zeros for them), so padding never touches real pages.

The block-table buffer is (max_batch_size, max_pages_per_seq): the decode kernel picks its split
count from shapes only, so a captured graph stays valid for every context length, and each
sequence cuts its own context into that many chunks, so a short context in the max_context-wide
table still spreads over every split. Capturing also compiles the decode kernels: the engine's
warm-up (runtime/dummy_step.py) covers the other steps.

`capture=False` runs the same padded static-buffer path eagerly (CPU tests of the padding logic).
"""

from __future__ import annotations

import torch

from fastllava.models.context import ForwardContext
from fastllava.runtime.step_io import to_device


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += range(16, max_batch_size, 16)
    return sorted(set(sizes) | {max_batch_size})


class DecodeGraphs:
    def __init__(self, model, ops, kv, max_batch_size: int, max_pages_per_seq: int, *,
                 capture: bool = True):
        self.model, self.ops, self.kv = model, ops, kv
        self.max_batch_size = max_batch_size
        self.page_size = kv.page_size
        device = kv.k[0].device
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        B = max_batch_size
        self.input_ids = torch.zeros(B, **i64)
        self.positions = torch.zeros(B, **i64)
        self.slot_mapping = torch.full((B,), -1, **i64)
        self.block_tables = torch.zeros(B, max_pages_per_seq, **i32)
        self.context_lens = torch.zeros(B, **i32)
        self.cu_seqlens = torch.arange(B + 1, **i32)         # unused by decode; kept consistent
        self.rows = torch.arange(B, **i64)
        self.buckets = batch_buckets(max_batch_size)
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = ForwardContext(is_prefill=False, positions=self.positions[:bs],
                             slot_mapping=self.slot_mapping[:bs],
                             block_tables=self.block_tables[:bs],
                             cu_seqlens=self.cu_seqlens[:bs + 1],
                             prefix_lens=self.context_lens[:bs],   # unused by decode
                             context_lens=self.context_lens[:bs], logits_rows=self.rows[:bs])
        embeds = self.model.embed(self.input_ids[:bs], None, None)
        return self.model(self.ops, embeds, ctx, self.kv)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):                   # largest first: its pool fits all
            self._forward(bs)                               # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], block_tables: torch.Tensor,
            future=None) -> torch.Tensor:
        """One decode token per sequence → fp32 logits (B, V). positions[i] is the new token's
        position; its KV goes to slot block_tables[i, p // S] * S + p % S. block_tables is the
        (B, width) int32 device table (`DeviceBlockTables.gather`); input ids < 0 are
        placeholders that `future` (a `FutureTokens`) resolves on the device."""
        B, S = len(input_ids), self.page_size
        bs = next(b for b in self.buckets if b >= B)
        # Only the columns the batch uses are written: entries past a row's context (and the rows
        # of padding, context 0) are never read, so leftovers from earlier steps are harmless and
        # the copy stays O(B x pages in use), not O(bucket x max_pages_per_seq).
        width = block_tables.shape[1]
        pad = [0] * (bs - B)
        # Host lists go through pinned memory and non_blocking copies: the CPU stays ahead.
        ids = to_device(input_ids + pad, torch.int64, self.input_ids.device)
        if future is not None:
            ids = future.resolve(ids, input_ids + pad)
        self.input_ids[:bs].copy_(ids)
        pos = to_device(positions + pad, torch.int64, self.positions.device)
        self.positions[:bs].copy_(pos)
        self.block_tables[:B, :width].copy_(block_tables)
        # slot = table[row, p // S] * S + p % S, computed from the device table (no host lists).
        page = self.block_tables[:B].gather(1, (pos[:B] // S)[:, None]).squeeze(1).to(torch.int64)
        self.slot_mapping[:B].copy_(page * S + pos[:B] % S)
        self.slot_mapping[B:bs].fill_(-1)
        self.context_lens[:bs].copy_(pos + 1)
        self.context_lens[B:bs].fill_(0)
        if self.graphs:
            self.graphs[bs].replay()
            out = self.outputs[bs]
        else:
            out = self._forward(bs)
        return out[:B]
