"""Decode under tensor parallelism: every rank runs the same padded bucket from its own static
buffers (runtime/cuda_graphs.DecodeGraphs), captured as a CUDA graph with the NCCL collectives
inside it on CUDA, run eagerly (capture=False) elsewhere.

A step: rank 0 announces the bucket on the ctrl group (one int64 header, OP_DECODE), fills its
static buffers (`DecodeGraphs.run_batch`: `DecodeInputs.fill` writes ids with the on-device
future tokens resolved, positions, KV slots and context lengths in place, advanced on the device
in a steady decode; then the block tables), then replays. The first op of every captured step is a
broadcast of rank 0's static inputs, packed as one int64 tensor, into every rank's buffers (it
rides on the model's `embed`, the decode body's first call: `_SharingInputs`); then embed, decoder
and lm_head with their all-reduces / all-gather. A worker's host work per step is the header and
`follow(bucket)`: DecodeGraphs.run over placeholder rows (a few small copies the broadcast then
overwrites) and the replay. Only public methods of DecodeGraphs are used, no private one.
Workers capture (and never replay) the sampler graphs DecodeGraphs may hold: rank 0 samples.

Capture rules followed (NCCL >= 2.9.6 captures collectives; torch >= 2.2 keeps captured work off
the NCCL watchdog, pytorch#103503):
- A graph launch containing NCCL ops is a collective over the ranks that captured it (NCCL guide,
  "Using NCCL with CUDA Graphs"): every rank captures the same buckets in the same order (same
  max_batch_size and block-table width, sent with OP_GRAPHS) and replays the bucket rank 0 names.
- The communicator exists before capture: DecodeGraphs runs each bucket eagerly once on every
  rank before capturing it, which is a real collective step (and inits NCCL lazily out of capture).
- No host sync inside: TPComm waits on NCCL work untimed, which orders the stream, not the host.
- Rank 0 sends the header before it replays, and a worker replays as soon as it has it: no rank
  blocks on its host while a peer's GPU waits in a collective for it.
The broadcast carries the whole (bucket, max_pages_per_seq) block table, static in the graph:
bucket x width x 8 bytes (64 x 512 pages: 256 KB), a few µs over NVLink.
"""

from __future__ import annotations

import torch

from fastllava.runtime import tp_step
from fastllava.runtime.cuda_graphs import DecodeGraphs


class TPDecodeGraphs(DecodeGraphs):
    """DecodeGraphs of one rank. Rank 0 (`driver` given) steps through `run_batch`; a worker calls
    `follow(bucket)` when rank 0's header names the bucket."""

    def __init__(self, model, ops, kv, max_batch_size: int, max_pages_per_seq: int, comm, *,
                 capture: bool, driver=None):
        self.comm, self.driver = comm, driver
        super().__init__(_SharingInputs(model, self), ops, kv, max_batch_size,
                         max_pages_per_seq, capture=capture)

    def share_inputs(self, bs: int) -> None:
        """Rank 0's static inputs of the bucket's rows → every rank's buffers (one broadcast)."""
        views = [t[:bs].reshape(-1) for t in (self.input_ids, self.positions, self.slot_mapping,
                                               self.context_lens, self.block_tables)]
        packed = self.comm.broadcast(torch.cat([v.to(torch.int64) for v in views]))
        if self.comm.rank:
            for view, part in zip(views, packed.split([v.numel() for v in views])):
                view.copy_(part)

    def run_batch(self, seqs, *args) -> torch.Tensor:
        """Rank 0's decode step (DecodeGraphs.run_batch: DecodeInputs fills the static buffers),
        with the workers told the bucket first."""
        return self._with_every_rank(len(seqs), DecodeGraphs.run_batch, seqs, *args)

    def run(self, input_ids: list[int], *args) -> torch.Tensor:
        """Rank 0: the list-built DecodeGraphs.run, with the workers told the bucket first."""
        return self._with_every_rank(len(input_ids), DecodeGraphs.run, input_ids, *args)

    def _with_every_rank(self, batch_size: int, step, *args) -> torch.Tensor:
        bs = self.bucket(batch_size)

        def with_every_rank(comm) -> torch.Tensor:
            comm.broadcast_header(tp_step.header(tp_step.OP_DECODE, bs))
            return step(self, *args)
        return self.driver.step(with_every_rank, self.kv)

    def follow(self, bs: int) -> None:
        """Workers: rank 0's step of bucket bs. DecodeGraphs.run over placeholder rows (ids and
        positions 0, page 0): the step's first op overwrites them with rank 0's inputs; then the
        same graph replay (or eager body) as rank 0's. The outputs stay unread."""
        DecodeGraphs.run(self, [0] * bs, [0] * bs, self.block_tables[:bs, :1])

    def replay(self, bs: int) -> None:
        """Rank 0: bucket bs's captured graph again on every rank over the inputs already in
        rank 0's buffers (bench/decode.py's bare-replay row)."""
        def with_every_rank(comm) -> None:
            comm.broadcast_header(tp_step.header(tp_step.OP_DECODE, bs))
            self.graphs[bs].replay()
        self.driver.step(with_every_rank, self.kv)


class _SharingInputs:
    """The model as the decode buckets call it: `embed`, the first op of the decode body, first
    broadcasts rank 0's static inputs of the bucket (the ids it is given are the buffers' first
    rows, so the broadcast lands in what it then reads)."""

    def __init__(self, model, graphs: TPDecodeGraphs):
        self._model, self._graphs = model, graphs

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def embed(self, ids: torch.Tensor, *args):
        self._graphs.share_inputs(ids.shape[0])
        return self._model.embed(ids, *args)
