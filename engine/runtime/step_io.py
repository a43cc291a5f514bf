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
        # (base, k) → (placeholder ids, the ring's view of those entries), made once each
        self._slots: dict[tuple[int, int], tuple[list[int], torch.Tensor]] = {}
        self._last: tuple[list[int], torch.Tensor] | None = None     # the latest put's

    def put(self, ids: torch.Tensor) -> list[int]:
        """Store a step's sampled ids (k,) on the device → their k placeholder ids (a list
        shared between the steps that use the same half and k: read it, never change it)."""
        k = ids.shape[0]
        if k > self.max_rows:
            raise ValueError(f"{k} sampled rows exceed the ring's {self.max_rows}")
        base = (self._step % 2) * self.max_rows
        self._step += 1
        slot = self._slots.get((base, k))
        if slot is None:
            slot = self._slots[base, k] = ([-(1 + base + i) for i in range(k)],
                                           self.ids[base:base + k])
        slot[1].copy_(ids)
        self._last = slot
        return slot[0]

    def latest(self, host_ids: list[int]) -> torch.Tensor | None:
        """The latest put's ids as a device view when host_ids are exactly its placeholders, in
        order (a steady decode step's inputs: no copy, no gather); else None. The view stays
        valid while the stream runs the next step: the half it shows is written again only by
        the put after next."""
        if self._last is None or host_ids != self._last[0]:
            return None
        return self._last[1]

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
        self._last: _Gathered | None = None

    def gather(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, max pages in the batch) int32 on the device: each seq's pages, zero padded."""
        lens = [len(seq.block_table) for seq in seqs]
        resets = [seq.num_page_resets for seq in seqs]
        last = self._last
        self._last = None                     # set again below, once the table is in sync
        if last is not None and seqs == last.seqs and resets == last.resets and not last.stale:
            # The batch of the call before (a steady decode): only appended pages are new, and
            # the output of that call is still right when none were and the table was kept.
            grown = [i for i, n, m in zip(range(len(seqs)), lens, last.lens) if n != m]
            if grown:
                self._write([seqs[i] for i in grown])
            width = max(lens)
            self._fit(width)
            if width != last.width or self.table is not last.table or (grown and not last.view):
                last.out, last.view = self._rows(last.rows, width)
        else:
            self._write(seqs)
            width = max(lens)
            self._fit(width)
            rows = [self._row[seq.seq_id] for seq in seqs]
            out, view = self._rows(rows, width)
            # Columns past a seq's own pages hold an earlier occupant's pages: zero them, as the
            # list-built tables did (no kernel should read them: they are past every context
            # length). The row's high-water mark says whether any are there.
            stale = any(self._high[row] > n for row, n in zip(rows, lens))
            for row, n in zip(rows, lens):
                self._high[row] = max(self._high[row], n)
            if stale:
                lens_t = to_device(lens, torch.int64, self.device)
                cols_t = torch.arange(width, device=self.device)
                out = out.masked_fill(cols_t[None, :] >= lens_t[:, None], 0)   # not the table
            last = _Gathered(list(seqs), rows, out, view and not stale, stale)
        last.lens, last.resets, last.width, last.table = lens, resets, width, self.table
        self._last = last
        return last.out

    def _write(self, seqs: list[Sequence]) -> None:
        """Bring the table rows of seqs up to date: new pages as new columns, a row whose pages
        were freed since (num_page_resets moved) rewritten from scratch; one scatter."""
        rows, cols, pages = [], [], []           # new entries: (row, column, page id)
        for seq in seqs:
            row = self._row.get(seq.seq_id)
            if row is None:
                row = self._row[seq.seq_id] = self._take_row()
            resets, done = self._synced.get(seq.seq_id, (seq.num_page_resets, 0))
            if resets != seq.num_page_resets:
                done = 0                                  # freed and refilled: rewrite the row
            bt = seq.block_table
            if done < len(bt):
                rows += [row] * (len(bt) - done)
                cols += range(done, len(bt))
                pages += bt[done:]
                self._synced[seq.seq_id] = (seq.num_page_resets, len(bt))
                self._high[row] = max(self._high[row], len(bt))
        if pages:        # one copy of (flat index, page) pairs, one scatter into the flat table
            self._fit(max(cols) + 1)
            W = self.table.shape[1]          # int32 indices: the table holds far below 2**31
            ip = to_device([[r * W + c for r, c in zip(rows, cols)], pages], torch.int32,
                           self.device)
            self.table.view(-1)[ip[0]] = ip[1]

    def _rows(self, rows: list[int], width: int) -> tuple[torch.Tensor, bool]:
        """(the batch's rows of the table, whether that is a view of it)."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            # Rows in batch order (the usual case: rows are handed out in admission order): a
            # view, no index copy. Later column writes are queued after this step's reads.
            return self.table[rows[0]:rows[0] + len(rows), :width], True
        return self.table[to_device(rows, torch.int64, self.device), :width], False

    def release(self, seq: Sequence) -> None:
        self._last = None
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


class _Gathered:
    """What one `gather` call saw and returned (the next call's shortcut)."""

    def __init__(self, seqs: list[Sequence], rows: list[int], out: torch.Tensor, view: bool,
                 stale: bool):
        self.seqs, self.rows, self.out, self.view, self.stale = seqs, rows, out, view, stale
        self.lens: list[int] = []
        self.resets: list[int] = []
        self.width = 0
        self.table: torch.Tensor | None = None


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
            self._event.record(torch.cuda.current_stream(ids.device))   # the copy's stream
            ids = host
        self._ids = ids

    def row_placeholders(self) -> list[int | None]:
        """Per batch row: its placeholder id, None for rows that do not sample."""
        if len(self.placeholders) == len(self.samples):      # every row samples (decode)
            return list(self.placeholders)
        it = iter(self.placeholders)
        return [next(it) if s else None for s in self.samples]

    def tokens(self) -> list[int | None]:
        """Per batch row: the sampled id, None for rows that do not sample (waits for the ids)."""
        if self._ids is None:
            return [None] * len(self.samples)
        if self._event is not None:
            self._event.synchronize()
        ids = self._ids.tolist()
        if len(ids) == len(self.samples):
            return ids
        it = iter(ids)
        return [next(it) if s else None for s in self.samples]
