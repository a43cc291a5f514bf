"""Decode steps replayed from CUDA graphs, the sampler included: per batch-size bucket one decode
graph (forward + greedy argmax) and two sampler graphs (temperature/top-p races without and with
the top-p sort).

A decode step of a 13B model is ~400 kernel launches; at batch 1 the launch overhead alone would
eat most of a 7.7 ms token. Each bucket (1, 2, 4, 8, then steps of 16 up to max_batch_size) is
captured once, largest first, into one shared memory pool (smaller graphs reuse the largest one's
activations). Inputs go through static buffers; a batch of B < bucket rows is padded with rows
whose KV slot is -1 (the KV-write kernel skips them) and whose context length is 0 (paged decode
returns zeros for them; id and position 0), so padding never touches real pages.

Filling the inputs (`run_batch`, the engine's path): ids, positions, slots and context lengths are
views of one `StaticInputs` (runtime/decode_inputs.py), laid out as `DecodeInputs` packs, and
`DecodeInputs.fill` builds the step there directly: in a steady decode (the same sequences as the
step before) that is two in-place adds and the ids copied from the future-token ring, no host
lists and no host→device copy (a new page: one small scatter); otherwise one packed copy per
dtype, padding rows included. Then the batch's block-table columns are copied in (one device copy
of `DeviceBlockTables.gather`'s view). `run` takes host lists instead (ids, positions; slots from
the device table): the reference run_batch is tested against, and the TP workers' placeholder
step; it marks the buffers as written by someone else, so the next fill packs afresh.

The block-table buffer is (max_batch_size, max_pages_per_seq): the decode kernel picks its split
count from shapes only, so a captured graph stays valid for every context length, and each
sequence cuts its own context into that many chunks, so a short context in the max_context-wide
table still spreads over every split. Capturing also compiles the decode kernels: the engine's
warm-up (runtime/dummy_step.py) covers the other steps.

What a step replays. The decode graph runs the forward and `logits.argmax(-1)`: a greedy step
(every row temperature 0, most traffic) is that one replay, its ids ready with no further launch.
A step with any sampled row then replays a sampler graph over the same bucket: `sample()` itself
(runtime/sampler.py: host-sync free, static shapes, counter-based noise) reading the decode graph's
logits output and static (bucket,) buffers of temperature, top_p, seed and step, so its ids are
`sample(logits, params)`'s bit for bit (every sampler op is row-wise, so the bucket's extra rows
change nothing). Which graph replays is picked on the host from the SamplingBatch's promises
(`all_greedy`, `any_top_p`): no sync. The sampler is captured apart from the forward rather than
as a second full decode graph per bucket: the forward (~400 kernels) is captured once, and a
sampled step pays one more graph launch (a few µs) instead of ~90-110 eager sampler ops (counted
with a dispatch mode: mostly the integer hash of the noise), each a kernel launch.
The logits output stays reachable (`run` returns it): rows that ask for logprobs read it.

Padding rows of the sampler keep whatever parameters an earlier, larger batch left there (never
written: a cheaper step); they only shape their own rows' ids, which nobody reads, and no op of
the sampler writes outside its own temporaries and output.

Memory: the sampler graphs' temporaries share the one pool. At the largest bucket B the top-p
sampler's live tensors peak at ≈17 bytes per logit (≈12 without the top-p sort; counted on CPU
over every op's outputs, tests/runtime/test_sampler_bytes.py): the sort's fp32 values and int64
indices beside one fp32 (B, V) scratch, then the scores and the noise's two int32 (B, V) tensors;
CUDA adds the sort's scratch. B = 64 at V = 64,000 is ≈70 MB beside the logits (≈190 MB before
the sampler ran in place), still more than a decode forward's own activations at that batch.
The memory plan's graph-pool term measures a decode step followed by the top-p sampler
(`DummySteps.decode_and_sample`), so the KV pool leaves room for it. The other persistent
additions are the ids outputs, (bucket,) int64 per graph: bytes.

`capture=False` runs the same padded static-buffer path eagerly (CPU tests of the padding logic).
"""

from __future__ import annotations

import torch

from fastllava.models.context import ForwardContext
from fastllava.runtime.decode_inputs import DecodeInputs, StaticInputs
from fastllava.runtime.sampler import SamplingBatch, sample
from fastllava.runtime.sequence import Sequence
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
        # ids, positions, slots, context lengths: views of the layout DecodeInputs builds in.
        self.inputs = StaticInputs(B, device)
        self.input_ids, self.positions = self.inputs.ids, self.inputs.positions
        self.slot_mapping, self.context_lens = self.inputs.slots, self.inputs.context_lens
        self.block_tables = torch.zeros(B, max_pages_per_seq, **i32)
        self.cu_seqlens = torch.arange(B + 1, **i32)         # unused by decode; kept consistent
        self.rows = torch.arange(B, **i64)
        # The sampler graphs' parameters (SamplingBatch's fields, batch order, padding rows stale).
        self.temperature = torch.zeros(B, dtype=torch.float32, device=device)
        self.top_p = torch.ones(B, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(B, **i64)
        self.steps = torch.zeros(B, **i64)
        self.buckets = batch_buckets(max_batch_size)
        # Captured outputs: bucket → (logits (bs, V) fp32, greedy ids (bs,)); (bucket, any_top_p)
        # → sampled ids (bs,). Blocks of the shared pool, valid until the next run(): a sampler
        # graph's output may sit in blocks another graph uses as temporaries. The runner copies
        # the ids out (future ring, pinned host) in stream order before it runs again.
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sampled: dict[tuple[int, bool], torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sampler_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._params: SamplingBatch | None = None    # in the static parameter rows [:B]
        self._last: tuple[int, int, torch.Tensor, torch.Tensor] | None = None  # the last run's
        if capture:
            self._capture()

    def _decode(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode graph's body: (logits (bs, V) fp32, greedy ids (bs,) int64)."""
        ctx = ForwardContext(is_prefill=False, positions=self.positions[:bs],
                             slot_mapping=self.slot_mapping[:bs],
                             block_tables=self.block_tables[:bs],
                             cu_seqlens=self.cu_seqlens[:bs + 1],
                             prefix_lens=self.context_lens[:bs],   # unused by decode
                             context_lens=self.context_lens[:bs], logits_rows=self.rows[:bs])
        embeds = self.model.embed(self.input_ids[:bs], None, None)
        logits = self.model(self.ops, embeds, ctx, self.kv)
        return logits, logits.argmax(dim=-1)    # sample()'s greedy rule: the first maximum

    def _sample(self, bs: int, any_top_p: bool, logits: torch.Tensor) -> torch.Tensor:
        """A sampler graph's body: sample() over the bucket's rows with the static parameters."""
        params = SamplingBatch(temperature=self.temperature[:bs], top_p=self.top_p[:bs],
                               seeds=self.seeds[:bs], steps=self.steps[:bs],
                               all_greedy=False, any_top_p=any_top_p)
        return sample(logits, params)

    @torch.inference_mode()
    def _capture(self) -> None:
        # A capture stream of the KV cache's device, never torch.cuda.graph's default: that one
        # is made once per process, on whichever device was current at the first capture, and
        # entering it makes its device current. A second engine on another GPU would then
        # capture on the first GPU: torch ops (on their tensors' device) run eagerly, outside
        # the graph, and only Triton launches (current device) are recorded (pytorch#87894).
        # thread_local: under the default "global" mode, any other thread's potentially unsafe
        # CUDA call (a sync, a cudaMalloc) during this capture fails, so another engine of this
        # process serving on another GPU would crash while this one builds.
        stream = torch.cuda.Stream(device=self.kv.k[0].device)
        capture = dict(stream=stream, capture_error_mode="thread_local")
        pool = None
        for bs in reversed(self.buckets):                   # largest first: its pool fits all
            self._decode(bs)                                # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, **capture):
                self.outputs[bs] = self._decode(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
            logits = self.outputs[bs][0]
            for any_top_p in (False, True):
                # Read the decode graph's (live) logits; temporaries reuse the pool's free blocks.
                self._sample(bs, any_top_p, logits)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, **capture):
                    self.sampled[bs, any_top_p] = self._sample(bs, any_top_p, logits)
                self.sampler_graphs[bs, any_top_p] = graph
        torch.cuda.synchronize()

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def run_batch(self, seqs: list[Sequence], inputs: DecodeInputs, block_tables: torch.Tensor
                  ) -> torch.Tensor:
        """The engine's decode step: one token per seq (its last) → fp32 logits (B, V).
        `inputs.fill` writes ids, positions, slots and lengths straight into the static buffers
        (a steady step: two in-place adds and the ids from the ring, no host lists); block_tables
        is the (B, width) int32 device table (`DeviceBlockTables.gather`). `sample` then gives the
        step's ids. Both are valid until the next run. Called in inference mode (from
        ModelRunner.launch: a decorator here would cost ~1 µs a step for nothing)."""
        B = len(seqs)
        bs = self.bucket(B)
        inputs.fill(seqs, self.inputs, bs)
        self._copy_tables(B, block_tables)
        return self._replay(bs, B)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], block_tables: torch.Tensor
            ) -> torch.Tensor:
        """The same step from host lists (ids known, no placeholders): positions[i] is the new
        token's position, its KV slot block_tables[i, p // S] * S + p % S computed on the device.
        The reference `run_batch` is tested against, and the TP workers' placeholder step."""
        B, S = len(input_ids), self.page_size
        bs = self.bucket(B)
        self.inputs.filled = None           # DecodeInputs' carried-over rows are overwritten
        pad = [0] * (bs - B)
        self.input_ids[:bs].copy_(to_device(input_ids + pad, torch.int64, self.input_ids.device))
        pos = to_device(positions + pad, torch.int64, self.positions.device)
        self.positions[:bs].copy_(pos)
        self._copy_tables(B, block_tables)
        # slot = table[row, p // S] * S + p % S, computed from the device table (no host lists).
        page = self.block_tables[:B].gather(1, (pos[:B] // S)[:, None]).squeeze(1).to(torch.int64)
        self.slot_mapping[:B].copy_(page * S + pos[:B] % S)
        self.slot_mapping[B:bs].fill_(-1)
        self.context_lens[:bs].copy_(pos + 1)
        self.context_lens[B:bs].fill_(0)
        return self._replay(bs, B)

    def _copy_tables(self, B: int, block_tables: torch.Tensor) -> None:
        """Only the columns the batch uses are written: entries past a row's context (and the
        rows of padding, context 0) are never read, so leftovers from earlier steps are harmless
        and the copy stays O(B x pages in use), not O(bucket x max_pages_per_seq)."""
        self.block_tables[:B, :block_tables.shape[1]].copy_(block_tables)

    def _replay(self, bs: int, B: int) -> torch.Tensor:
        if self.graphs:
            self.graphs[bs].replay()
            logits, greedy = self.outputs[bs]
        else:
            logits, greedy = self._decode(bs)
        self._last = (bs, B, logits, greedy)
        return logits[:B]

    @torch.inference_mode()
    def sample(self, params: SamplingBatch) -> torch.Tensor:
        """The ids (B,) int64 of the last `run`'s rows: `sample(logits, params)` bit for bit.
        params: the B rows' SamplingBatch in batch order. An all-greedy step costs nothing here
        (its argmax ran in the decode graph); otherwise the parameters are copied into the static
        buffers (device to device, queued) and a sampler graph replays. The batch of the sampled
        step before, reused (`SamplingBatches`: the same rows, only `steps` advanced in place;
        a SamplingBatch's other fields never change), copies its steps alone."""
        if self._last is None:
            raise RuntimeError("DecodeGraphs.sample() needs a run() first")
        bs, B, logits, greedy = self._last
        if params.temperature.shape != (B,):
            raise ValueError(f"params hold {tuple(params.temperature.shape)} rows, the last run "
                             f"{B}")
        if params.all_greedy:
            return greedy[:B]
        if params is not self._params:
            for static, values in ((self.temperature, params.temperature),
                                   (self.top_p, params.top_p), (self.seeds, params.seeds)):
                static[:B].copy_(values)
            self._params = params     # held: its id is not reused while compared against
        self.steps[:B].copy_(params.steps)
        key = (bs, params.any_top_p)
        if self.sampler_graphs:
            self.sampler_graphs[key].replay()
            return self.sampled[key][:B]
        return self._sample(*key, logits)[:B]
