"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`). Running sequences come first: decodes
(one token each, oldest first), then prompts still being prefilled, in chunks that fit what is
left of the budget (chunked prefill: a long image prompt never stalls the decodes for a whole
prefill). A step that decodes holds its prefill tokens (running prefills and admissions together)
to `max_prefill_tokens_while_decoding`, so streams wait at most one such chunk per token, not a
whole step budget; with nothing decoding, a prompt prefills up to the whole budget in one step. Waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and
the free KV pages allow; a sequence whose head cannot be admitted blocks the ones behind it (FIFO,
no starvation). Prefix-cache hits are taken at admission.

When a running sequence needs a page and none is free, the newest running sequence not yet
scheduled in this step is preempted: its pages are freed and it goes back to the front of the
waiting queue, to be recomputed later (prompt + tokens generated so far). A sequence never
preempts an older one; it preempts itself instead. No torch here.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import time

from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.sequence import Sequence, Status


_seq_id = operator.attrgetter("seq_id")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64                 # sequences running at once (CUDA-graph buckets up to it)
    max_num_batched_tokens: int = 2048     # tokens per step: decodes + prefill chunks
    max_prefill_tokens_while_decoding: int = 512   # prefill tokens in a step that also decodes

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence must be "
                             "able to decode in one step")
        if self.max_prefill_tokens_while_decoding < 1:
            raise ValueError("max_prefill_tokens_while_decoding must be >= 1, got "
                             f"{self.max_prefill_tokens_while_decoding}")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step: seqs[i] computes token_ids[start[i]:start[i] + num_tokens[i]]."""
    seqs: list[Sequence]
    num_tokens: list[int]
    starts: list[int]
    is_decode: bool                       # every seq computes one generated token
    samples: list[bool]                   # seq reaches its last token: its logits give the next


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # Monotone counters for throughput logs and /metrics (plain ints: readers on other threads
        # see a consistent value of each, and the step pays one addition per row).
        self.num_prompt_tokens = 0        # prompt (and recomputed) tokens prefilled
        self.num_generation_tokens = 0    # tokens sampled
        self.num_prefix_query_tokens = 0  # tokens looked up in the prefix cache at admission
        self.num_prefix_hit_tokens = 0    # of those, found cached (their prefill was skipped)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if self.bm.pages_for(seq.max_len) > self.bm.num_pages:
            raise ValueError(f"sequence max_len {seq.max_len} exceeds the KV cache "
                             f"({self.bm.num_pages} pages of {self.bm.page_size})")
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Remove seq wherever it is and free its pages (cancel, error)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, reason)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        return self._schedule_steady_decode() or self._schedule_general()

    def _schedule_steady_decode(self) -> Batch | None:
        """The steady state's shortcut: nothing waits, and every running sequence decodes, is not
        capped, and gets the page its next token may need without preempting anyone. Then the
        general path's batch is known in advance: all of `running`, in order, one token each,
        fresh pages taken in seq_id order (the order it takes them in); this builds exactly that
        batch without its sort and per-row calls (most of a decode step's scheduling at B = 64).
        None (and nothing changed) when any condition fails."""
        S, running = self.bm.page_size, self.running
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return None
        short = []                         # sequences whose next token starts a new page
        for seq in running:
            c, n = seq.num_computed, len(seq.token_ids)
            if (n - c != 1 or c < seq.prompt_len or seq.status is not Status.RUNNING
                    or n - seq.prompt_len >= seq.params.max_tokens or n >= seq.max_len):
                return None
            if c >= len(seq.block_table) * S:
                short.append(seq)
        if short:
            bm = self.bm
            if sum(bm.pages_for(s.num_computed + 1) - len(s.block_table) for s in short) \
                    > bm.num_free_pages:
                return None
            for seq in sorted(short, key=_seq_id):
                bm.grow(seq, seq.num_computed + 1)
        B = len(running)
        return Batch(seqs=list(running), num_tokens=[1] * B,
                     starts=[s.num_computed for s in running], is_decode=True,
                     samples=[True] * B)

    def _schedule_general(self) -> Batch | None:
        budget = self.config.max_num_batched_tokens
        chosen: dict[int, int] = {}               # seq_id → num tokens this step
        preempted = False
        prefill_left = None                       # prefill tokens left; set after the decodes
        # Decodes first (cheap, latency-critical), then running prefills; oldest first in each.
        for seq in sorted(self.running, key=lambda s: (not s.is_decoding, s.seq_id)):
            if seq.status is not Status.RUNNING or budget == 0 or seq.is_capped:
                continue       # capped: its last token is still on the device (overlapped loop)
            n = min(seq.num_uncomputed, budget)
            if not seq.is_decoding:
                if prefill_left is None:
                    prefill_left = self._prefill_cap(budget, decodes=bool(chosen))
                n = min(n, prefill_left)
                if n == 0:
                    continue
            if not self.bm.can_grow(seq, seq.num_computed + n):
                preempted = True           # someone (maybe seq itself) is preempted just below
            if not self._make_room(seq, seq.num_computed + n, chosen):
                continue
            self.bm.grow(seq, seq.num_computed + n)
            chosen[seq.seq_id] = n
            budget -= n
            if not seq.is_decoding:
                prefill_left -= n
        if prefill_left is None:
            prefill_left = self._prefill_cap(budget, decodes=bool(chosen))
        # Admit waiting sequences, unless this step already had to preempt.
        while (self.waiting and prefill_left > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            hits = self.bm.match_prefix(seq)
            cached = len(hits) * self.bm.page_size
            n = min(len(seq) - cached, prefill_left)
            if not self.bm.can_allocate(hits, cached + n):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, hits, cached + n)
            self.num_prefix_query_tokens += len(seq)
            self.num_prefix_hit_tokens += cached
            if seq.metrics.first_scheduled is None:
                seq.metrics.first_scheduled = time.monotonic()
                seq.metrics.cached_prompt_tokens = min(cached, seq.prompt_len)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen[seq.seq_id] = n
            prefill_left -= n
        if not chosen:
            return None
        seqs = [s for s in self.running if s.seq_id in chosen]
        num_tokens = [chosen[s.seq_id] for s in seqs]
        return Batch(seqs=seqs, num_tokens=num_tokens, starts=[s.num_computed for s in seqs],
                     is_decode=all(s.is_decoding for s in seqs),
                     samples=[s.num_computed + n == len(s) for s, n in zip(seqs, num_tokens)])

    def _prefill_cap(self, budget: int, decodes: bool) -> int:
        """Prefill tokens this step may hold: what is left of the budget, at most
        max_prefill_tokens_while_decoding when the step decodes (decodes are chosen first, so
        `decodes` is known before the first prefill token is)."""
        return min(budget, self.config.max_prefill_tokens_while_decoding) if decodes else budget

    def _make_room(self, seq: Sequence, num_tokens: int, chosen: dict[int, int]) -> bool:
        """Preempt newer unscheduled sequences until seq can grow to num_tokens; False if seq
        itself had to be preempted."""
        while not self.bm.can_grow(seq, num_tokens):
            candidates = [s for s in self.running if s.seq_id not in chosen and s is not seq]
            victim = max(candidates, key=lambda s: s.seq_id, default=None)
            if victim is None or victim.seq_id < seq.seq_id:
                victim = seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        # Newest is preempted first, so appendleft leaves the oldest preempted at the front.
        self.waiting.appendleft(seq)

    def update(self, batch: Batch, tokens: list[int | None]) -> list[Sequence]:
        """Record a finished step: advance each seq, append its sampled token (None where the
        step ended mid-prompt), register newly full pages; return the seqs that finished."""
        if [t is not None for t in tokens] != batch.samples:
            raise ValueError(f"tokens {tokens} do not match the rows that sample {batch.samples}")
        finished = []
        now = time.monotonic()
        for seq, n, token in zip(batch.seqs, batch.num_tokens, tokens):
            if seq.status is not Status.RUNNING:     # aborted while the step ran
                continue
            if not seq.is_decoding:
                self.num_prompt_tokens += n
            seq.num_computed += n
            self.bm.commit(seq)
            if token is None:
                continue
            self.num_generation_tokens += 1
            if seq.metrics.first_token is None:
                seq.metrics.first_token = now
            reason = seq.append(token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    # ---- the overlapped loop: a step's bookkeeping before and after its tokens are known ------
    def advance(self, batch: Batch, placeholders: list[int | None]) -> list[tuple]:
        """Step `batch` was launched; its tokens are still on the device. Count its computed
        tokens now and append each sampling row's placeholder id (which the runner resolves on
        the device), so the next step can be scheduled at once. Returns the step's pending rows
        (seq, num_computed after the step, placeholder index or None) for `resolve`."""
        if [p is not None for p in placeholders] != batch.samples:
            raise ValueError(f"placeholders {placeholders} do not match the rows that sample "
                             f"{batch.samples}")
        pending = []
        if batch.is_decode:         # one token per row and every row samples: the steady state
            for seq, placeholder in zip(batch.seqs, placeholders):
                seq.num_computed += 1
                pending.append((seq, seq.num_computed, len(seq.token_ids)))
                seq.token_ids.append(placeholder)
            return pending
        for seq, n, placeholder in zip(batch.seqs, batch.num_tokens, placeholders):
            if not seq.is_decoding:
                self.num_prompt_tokens += n
            seq.num_computed += n
            index = None
            if placeholder is not None:
                index = len(seq)
                seq.token_ids.append(placeholder)
            pending.append((seq, seq.num_computed, index))
        return pending

    def resolve(self, pending: list[tuple], tokens: list[int | None]) -> list[Sequence]:
        """The tokens of an advanced step arrived: put them in place of the placeholders,
        register the step's full pages, finish the seqs that stopped. A seq finished meanwhile
        (cancelled, or stopped one step earlier: the lag's extra token) is skipped. Returns the
        seqs that finished here."""
        finished = []
        now = time.monotonic()
        commit, generated = self.bm.commit, 0
        for (seq, num_computed, index), token in zip(pending, tokens):
            status = seq.status
            if status is Status.FINISHED:
                continue
            if status is Status.RUNNING:              # not preempted since: its pages are intact
                commit(seq, num_computed)
            if index is None:
                continue
            generated += 1
            metrics = seq.metrics
            if metrics.first_token is None:
                metrics.first_token = now
            reason = seq.set_token(index, token)
            if reason is not None:
                (self.running if seq.status is Status.RUNNING else self.waiting).remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        self.num_generation_tokens += generated
        return finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.bm.forget(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.metrics.finished = time.monotonic()
