"""A decode step's inputs on the device, carried over from the previous decode step if possible.

A decode step needs per row: the token id, its position p, its KV slot page(p) * S + p % S, the
prefix length p and the context length p + 1 (int32), and the constant logits row i and
cu_seqlens i. `DecodeInputs.build` packs them from the sequences (the source of truth): one int64
and one int32 host→device copy. In a steady decode (the same sequences as the previous build, in
the same order, each exactly one token further, no page freed since) nothing is packed:

- positions, slots, prefix and context lengths move by +1 on the device (one in-place add per
  dtype); rows whose new token opens a page (p % S == 0) get slot = page * S from the host (one
  small copy and a scatter, in one step of every S per row);
- token ids: in the overlapped loop they are the placeholders the previous step returned, in
  order, i.e. that step's sampled ids where they lie in the ring (`FutureTokens.latest`, a view);
  known ids (the serial loop) take one copy.

"Steady" is checked on every call from the sequences themselves (identity, positions, page
resets), never assumed: anything else (a new, finished or preempted row, a mixed step in between)
packs afresh. Per-step host work at batch 1 is a few list comprehensions and two adds instead of
two packed copies and their views (tests/runtime/test_decode_inputs.py compares both paths).

`build` packs into tensors of its own (the eager decode, which reads a ForwardContext); `fill`
builds the same inputs in place in the CUDA-graph decode's static buffers (`StaticInputs`, views
`DecodeGraphs` reads, rows past the batch up to the bucket padded: slot -1, context 0), so the
graphed path gets the same shortcuts with no copy in between (ids from the ring take one device
copy: a graph reads them at a fixed address). A steady fill also requires that the buffers were
last written by this DecodeInputs' previous fill (`StaticInputs.filled`).
"""

from __future__ import annotations

import torch

from fastllava.models.context import ForwardContext
from fastllava.runtime.sequence import Sequence
from fastllava.runtime.step_io import FutureTokens, to_device


class StaticInputs:
    """The decode graphs' input buffers in the layout `DecodeInputs` packs, so that it can build a
    step's inputs in place (`DecodeInputs.fill`): ints (3, W) int64 rows positions; slots; ids and
    lens (2, W4) int32 rows prefix; context lengths, W and W4 max_rows rounded up to 16 bytes (each
    row starts aligned, as Triton's pointer specialization wants). Rows past a batch are padding:
    id 0, position 0, slot -1 (the KV write skips it), context 0 (paged decode returns zeros).
    `filled` is the `DecodeInputs` state that last wrote the buffers; any other writer (the list-
    built `DecodeGraphs.run`) sets it to None, so the next fill packs afresh."""

    def __init__(self, max_rows: int, device: torch.device):
        W, W4 = -(-max_rows // 2) * 2, -(-max_rows // 4) * 4
        self.ints = torch.zeros(3, W, dtype=torch.int64, device=device)
        self.ints[1].fill_(-1)
        self.lens = torch.zeros(2, W4, dtype=torch.int32, device=device)
        self.positions, self.slots, self.ids = (row[:max_rows] for row in self.ints)
        self.prefix_lens, self.context_lens = (row[:max_rows] for row in self.lens)
        self.filled: _Packed | None = None


class _Packed:
    """The device tensors of the latest build and what they were built for."""

    def __init__(self, seqs: list[Sequence], resets: list[int], ints: torch.Tensor,
                 lens: torch.Tensor, home: StaticInputs | None):
        B = len(seqs)
        self.seqs, self.resets, self.home = seqs, resets, home
        self.ints = ints                  # (3, >= B) int64: positions; slots; ids
        self.moving = ints[:2]            # positions and slots: +1 per steady step
        self.lens = lens                  # (2, >= B) int32: prefix (= p); context (= p + 1)
        self.positions, self.slots, self.ids = ints[0, :B], ints[1, :B], ints[2, :B]
        self.prefix_lens, self.context_lens = lens[0, :B], lens[1, :B]
        self.next_positions: list[int] = []
        self.has_prefix = False           # any row with a cached prefix (host ints, no sync)


class DecodeInputs:
    def __init__(self, device: torch.device, page_size: int, future: FutureTokens):
        self.device, self.page_size, self.future = device, page_size, future
        self._last: _Packed | None = None
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # B → (rows, cu)

    def build(self, seqs: list[Sequence], block_tables: torch.Tensor
              ) -> tuple[torch.Tensor, ForwardContext]:
        """One token per seq (its last) → (token ids (B,) int64 on the device, placeholders
        resolved; the step's context). block_tables: the batch's (B, width) device table."""
        packed, ids_t = self._advance_or_pack(seqs, None, len(seqs))
        rows, cu = self._constants.get(len(seqs)) or self._make_constants(len(seqs))
        ctx = ForwardContext(
            is_prefill=False, positions=packed.positions, slot_mapping=packed.slots,
            block_tables=block_tables, cu_seqlens=cu, prefix_lens=packed.prefix_lens,
            context_lens=packed.context_lens, logits_rows=rows,
            has_prefix=packed.has_prefix)
        return ids_t, ctx

    def fill(self, seqs: list[Sequence], home: StaticInputs, bucket: int) -> None:
        """The same inputs, written into home's first B = len(seqs) rows (ids resolved), rows
        B..bucket as padding: the decode graphs read them there, no copy between."""
        packed, ids_t = self._advance_or_pack(seqs, home, bucket)
        if ids_t is not packed.ids:       # from the ring, or resolved into a new tensor
            packed.ids.copy_(ids_t)
        home.filled = packed

    def _advance_or_pack(self, seqs: list[Sequence], home: StaticInputs | None, bucket: int
                         ) -> tuple[_Packed, torch.Tensor]:
        """(the step's inputs, its token ids on the device): carried over from the last build
        when the step is steady and its tensors are untouched since, else packed afresh."""
        S = self.page_size
        positions = [len(seq.token_ids) - 1 for seq in seqs]
        ids = [seq.token_ids[-1] for seq in seqs]
        resets = [seq.num_page_resets for seq in seqs]
        last, self._last = self._last, None       # set again once this build has succeeded
        if (last is not None and last.home is home and (home is None or home.filled is last)
                and seqs == last.seqs and positions == last.next_positions
                and resets == last.resets):
            packed = last
            packed.moving.add_(1)
            packed.lens.add_(1)
            opened = [i for i, p in enumerate(positions) if p % S == 0]
            if opened:     # a new page: slot = its first entry, not the old slot + 1
                pages = [seqs[i].block_table[positions[i] // S] * S for i in opened]
                fix = to_device([opened, pages], torch.int64, self.device)
                packed.slots[fix[0]] = fix[1]
            ids_t = self.future.latest(ids)
            if ids_t is None:
                ids_t = self.future.resolve(to_device(ids, torch.int64, self.device), ids)
        else:
            packed = self._pack(seqs, positions, ids, resets, home, bucket)
            ids_t = self.future.latest(ids)
            if ids_t is None:
                ids_t = self.future.resolve(packed.ids, ids)
        packed.next_positions = [p + 1 for p in positions]
        packed.has_prefix = any(positions)
        self._last = packed
        return packed, ids_t

    def _pack(self, seqs: list[Sequence], positions: list[int], ids: list[int],
              resets: list[int], home: StaticInputs | None, bucket: int) -> _Packed:
        """The inputs from the sequences' lists: one int64 and one int32 copy (into home: and
        one device copy each, padding rows included). Each row of the two tensors starts 16-byte
        aligned (P, P4 rounded up to 16 bytes): Triton specializes pointers on it, and an
        unaligned view would compile a kernel variant mid-serving."""
        S, B = self.page_size, len(seqs)
        slots = [seq.block_table[p // S] * S + p % S for seq, p in zip(seqs, positions)]
        P, P4 = (bucket, bucket) if home is not None else (B + B % 2, -(-B // 4) * 4)
        pad, pad4 = [0] * (P - B), [0] * (P4 - B)
        slot_pad = [-1] * (P - B) if home is not None else pad      # padding rows: no KV write
        ints = to_device([positions + pad, slots + slot_pad, ids + pad], torch.int64, self.device)
        lens = to_device([positions + pad4, [p + 1 for p in positions] + pad4], torch.int32,
                         self.device)
        if home is None:
            return _Packed(list(seqs), resets, ints, lens, None)
        home.ints[:, :bucket].copy_(ints)
        home.lens[:, :bucket].copy_(lens)
        return _Packed(list(seqs), resets, home.ints[:, :B], home.lens[:, :B], home)

    def _make_constants(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits rows 0..B-1 int64, cu_seqlens 0..B int32): the same for every decode step."""
        pair = (torch.arange(B, dtype=torch.int64, device=self.device),
                torch.arange(B + 1, dtype=torch.int32, device=self.device))
        self._constants[B] = pair
        return pair
