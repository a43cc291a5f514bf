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
"""

from __future__ import annotations

import torch

from fastllava.models.context import ForwardContext
from fastllava.runtime.sequence import Sequence
from fastllava.runtime.step_io import FutureTokens, to_device


class _Packed:
    """The device tensors of the latest build and what they were built for."""

    def __init__(self, seqs: list[Sequence], resets: list[int], ints: torch.Tensor,
                 lens: torch.Tensor, rows: torch.Tensor, cu: torch.Tensor):
        B = len(seqs)
        self.seqs, self.resets = seqs, resets
        self.ints = ints                  # (3, P) int64: positions; slots; ids (P = B rounded up)
        self.moving = ints[:2]            # positions and slots: +1 per steady step
        self.lens = lens                  # (2, P4) int32: prefix (= p); context (= p + 1)
        self.positions, self.slots, self.ids = ints[0, :B], ints[1, :B], ints[2, :B]
        self.prefix_lens, self.context_lens = lens[0, :B], lens[1, :B]
        self.rows, self.cu = rows, cu
        self.next_positions: list[int] = []


class DecodeInputs:
    def __init__(self, device: torch.device, page_size: int, future: FutureTokens):
        self.device, self.page_size, self.future = device, page_size, future
        self._last: _Packed | None = None
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # B → (rows, cu)

    def build(self, seqs: list[Sequence], block_tables: torch.Tensor
              ) -> tuple[torch.Tensor, ForwardContext]:
        """One token per seq (its last) → (token ids (B,) int64 on the device, placeholders
        resolved; the step's context). block_tables: the batch's (B, width) device table."""
        S = self.page_size
        positions = [len(seq.token_ids) - 1 for seq in seqs]
        ids = [seq.token_ids[-1] for seq in seqs]
        resets = [seq.num_page_resets for seq in seqs]
        last, self._last = self._last, None       # set again once this build has succeeded
        if (last is not None and seqs == last.seqs and positions == last.next_positions
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
            packed = self._pack(seqs, positions, ids, resets)
            ids_t = self.future.latest(ids)
            if ids_t is None:
                ids_t = self.future.resolve(packed.ids, ids)
        ctx = ForwardContext(
            is_prefill=False, positions=packed.positions, slot_mapping=packed.slots,
            block_tables=block_tables, cu_seqlens=packed.cu, prefix_lens=packed.prefix_lens,
            context_lens=packed.context_lens, logits_rows=packed.rows,
            has_prefix=any(positions))
        packed.next_positions = [p + 1 for p in positions]
        self._last = packed
        return ids_t, ctx

    def _pack(self, seqs: list[Sequence], positions: list[int], ids: list[int],
              resets: list[int]) -> _Packed:
        """The inputs from the sequences' lists: one int64 and one int32 copy. Each row of the
        two tensors starts 16-byte aligned (P, P4 rounded up to 16 bytes): Triton specializes
        pointers on it, and an unaligned view would compile a kernel variant mid-serving."""
        S, B = self.page_size, len(seqs)
        slots = [seq.block_table[p // S] * S + p % S for seq, p in zip(seqs, positions)]
        pad, pad4 = [0] * (B % 2), [0] * (-B % 4)
        ints = to_device([positions + pad, slots + pad, ids + pad], torch.int64, self.device)
        lens = to_device([positions + pad4, [p + 1 for p in positions] + pad4], torch.int32,
                         self.device)
        rows, cu = self._constants.get(B) or self._make_constants(B)
        return _Packed(list(seqs), resets, ints, lens, rows, cu)

    def _make_constants(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits rows 0..B-1 int64, cu_seqlens 0..B int32): the same for every decode step."""
        pair = (torch.arange(B, dtype=torch.int64, device=self.device),
                torch.arange(B + 1, dtype=torch.int32, device=self.device))
        self._constants[B] = pair
        return pair
