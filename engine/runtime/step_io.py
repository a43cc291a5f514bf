"""What moves between the host and the device in one engine step, without making the host wait.

- `to_device`: a host list → a device tensor through pinned memory and a non_blocking copy. A
  pageable host→device copy makes the host wait until the stream reaches it (i.e. until the step
  before has run); from pinned memory the copy is queued and the host goes on packing. The pinned
  block comes from torch's caching host allocator, which keeps it (persistent after warm-up) and
  does not hand it out again before the copy that reads it has completed.
- `FutureTokens`: the "future token ids" of the overlapped loop (SGLang's overlap scheduler, vLLM's
  async scheduling). Step N's sampled ids are written into a device ring; step N+1 is packed on the
  host before they are known, with placeholder id -(1 + i) for ring entry i, and `resolve` swaps
  them for the real ids on the device: no host round trip between the two steps.
- `DeviceBlockTables`: block tables kept on the device, one row per sequence, updated
  incrementally: a page a sequence gained since its last step is written as one new column; a
  sequence whose pages were freed (preempted) gets its row rewritten from scratch.
- `StepOutput`: a launched step's sampled ids, copied to pinned host memory as soon as the sampler
  has produced them; `tokens()` is the only place the engine waits for the device.
"""

from __future__ import annotations

import torch

from fastllava.runtime.sequence import Sequence


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or nested lists) → a tensor on device, queued without a host wait on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def parts_to_device(parts: list[list[int]], dtype: torch.dtype, device: torch.device
                    ) -> list[torch.Tensor]:
    """Several host lists → one host→device copy, split into one device view per list. Each view
    starts 16 bytes aligned (its list is padded to a multiple of 16 bytes): Triton specializes a
    pointer argument on 16-byte alignment, so an unaligned view would compile (mid-serving) a
    kernel variant the warm-up never launched."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    padded = [-(-len(part) // per) * per for part in parts]
    flat = []
    for part, n in zip(parts, padded):
        flat += part
        flat += [0] * (n - len(part))
    views = to_device(flat, dtype, device).split(padded)
    return [view[:len(part)] for view, part in zip(views, parts)]


class FutureTokens:
    """A device ring of 2 x max_rows sampled ids. Step k writes half k % 2, so step N+1 (packed
    while step N's ids are not known yet) reads step N's half while writing the other one; the
    stream runs the steps in order, so a half is never overwritten before its reader has run."""

    def __init__(self, max_rows: int, device: torch.device):
        self.max_rows = max_rows
        self.ids = torch.zeros(2 * max_rows, dtype=torch.int64, device=device)
        self._step = 0

    def put(self, ids: torch.Tensor) -> list[int]:
        """Store a step's sampled ids (k,) on the device → their k placeholder ids."""
        k = ids.shape[0]
        if k > self.max_rows:
            raise ValueError(f"{k} sampled rows exceed the ring's {self.max_rows}")
        base = (self._step % 2) * self.max_rows
        self._step += 1
        self.ids[base:base + k].copy_(ids)
        return [-(1 + base + i) for i in range(k)]

    def resolve(self, ids: torch.Tensor, host_ids: list[int]) -> torch.Tensor:
        """ids (N,) int64 on the device, maybe with placeholders (< 0), and the same ids on the
        host (to pick the cheapest case) → the real ids, on the device."""
        if min(host_ids) >= 0:
            return ids
        if max(host_ids) < 0:                   # a steady decode step: every row is a placeholder
            return self.ids[-1 - ids]
        return torch.where(ids >= 0, ids, self.ids[(-1 - ids).clamp_(min=0)])


class DeviceBlockTables:
    """(rows, width) int32 page ids on the device; a row per sequence, grown by doubling."""

    def __init__(self, device: torch.device, rows: int = 8, width: int = 16):
        self.device = device
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self._row: dict[int, int] = {}                   # seq_id → row
        self._synced: dict[int, tuple[int, int]] = {}    # seq_id → (num_page_resets, columns)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._high = [0] * rows                          # per row: columns ever written

    def gather(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, max pages in the batch) int32 on the device: each seq's pages, zero padded."""
        rows, cols, pages = [], [], []
        stale = False
        for seq in seqs:
            row = self._row.get(seq.seq_id)
            if row is None:
                row = self._row[seq.seq_id] = self._take_row()
            resets, done = self._synced.get(seq.seq_id, (seq.num_page_resets, 0))
            if resets != seq.num_page_resets:
                done = 0                                  # freed and refilled: rewrite the row
            new = seq.block_table[done:]
            rows += [row] * len(new)
            cols += range(done, len(seq.block_table))
            pages += new
            self._synced[seq.seq_id] = (seq.num_page_resets, len(seq.block_table))
            stale |= self._high[row] > len(seq.block_table)
            self._high[row] = max(self._high[row], len(seq.block_table))
        width = max(len(seq.block_table) for seq in seqs)
        self._fit(width)
        if pages:        # one copy of (row, col, page) triples, one scatter
            rcp = to_device([rows, cols, pages], torch.int64, self.device)
            self.table[rcp[0], rcp[1]] = rcp[2].to(torch.int32)
        rows = [self._row[seq.seq_id] for seq in seqs]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            # Rows in batch order (the usual case: rows are handed out in admission order): a
            # view, no index copy. Later column writes are queued after this step's reads.
            out = self.table[rows[0]:rows[0] + len(rows), :width]
        else:
            out = self.table[to_device(rows, torch.int64, self.device), :width]
        if not stale:
            return out
        # Columns past a seq's own pages hold an earlier occupant's pages: zero them, as the
        # list-built tables did (no kernel should read them: they are past every context length).
        lens = to_device([len(seq.block_table) for seq in seqs], torch.int64, self.device)
        cols_t = torch.arange(width, device=self.device)
        return out.masked_fill(cols_t[None, :] >= lens[:, None], 0)     # never into the table

    def release(self, seq: Sequence) -> None:
        row = self._row.pop(seq.seq_id, None)
        self._synced.pop(seq.seq_id, None)
        if row is not None:
            self._free_rows.append(row)

    def _take_row(self) -> int:
        if not self._free_rows:
            n = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
            self._high += [0] * n
        return self._free_rows.pop()

    def _fit(self, width: int) -> None:
        if width > self.table.shape[1]:
            # Columns stay a multiple of 4 (16 bytes of int32), so every row a batch's view starts
            # at is 16-byte aligned: Triton specializes pointer alignment, and an unaligned table
            # would compile a kernel variant the warm-up never saw in the middle of serving.
            columns = max(-(-width // 4) * 4, 2 * self.table.shape[1])
            grown = torch.zeros(self.table.shape[0], columns,
                                dtype=torch.int32, device=self.device)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown


class StepOutput:
    """A launched step: `samples` (which rows sample), their placeholder ids, and the sampled ids
    on their way to pinned host memory."""

    def __init__(self, samples: list[bool], placeholders: list[int], ids: torch.Tensor | None):
        self.samples = samples
        self.placeholders = placeholders          # one per sampling row, in batch order
        self._event = None
        if ids is not None and ids.device.type == "cuda":
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            ids = host
        self._ids = ids

    def row_placeholders(self) -> list[int | None]:
        """Per batch row: its placeholder id, None for rows that do not sample."""
        it = iter(self.placeholders)
        return [next(it) if s else None for s in self.samples]

    def tokens(self) -> list[int | None]:
        """Per batch row: the sampled id, None for rows that do not sample (waits for the ids)."""
        if self._ids is None:
            return [None] * len(self.samples)
        if self._event is not None:
            self._event.synchronize()
        it = iter(self._ids.tolist())
        return [next(it) if s else None for s in self.samples]
