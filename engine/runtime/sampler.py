"""Batched next-token choice on the device, with no host sync and no torch.Generator.

Semantics per row (the same as the single-request reference `sample_ref`):
- temperature == 0: greedy, `logits.argmax(-1)`; ties go to the lowest id (torch.argmax returns the
  first max), as transformers' greedy search does.
- otherwise: logits / temperature, then top-p exactly as transformers' TopPLogitsWarper (sort
  ascending, softmax, cumsum, drop tokens whose cumulative mass is <= 1 - top_p, always keep the most
  likely), then one draw from softmax over the kept tokens. No top-k: the fal schema exposes none.

The draw is the exponential race (Gumbel-max): with E_v ~ Exp(1) independent,
    argmax_v p_v / E_v  ==  argmax_v (logits_v / T - log E_v)
is distributed exactly as softmax(logits / T) over the kept set. E_v = -log u_v, and u_v comes from a
counter-based hash of (seed, step, v) (runtime/sampling_noise.py), so a row's token depends only on
its own logits, temperature, top_p, seed and step: not on the other rows of the batch or their
order, not on how often the step was run (a preempted request re-runs a step to the same token),
and the whole function is a fixed sequence of device kernels with static shapes (CUDA-graph
capturable). The (B, V) work writes into a few reused buffers (see `race_scores`).

Shapes: B rows (sequences), V vocabulary entries.
"""

from __future__ import annotations

import dataclasses

import torch

from fastllava.kernels.row_cumsum import row_cumsum, row_cumsum_ref
from fastllava.runtime.row_sort import stable_sort_rows_
from fastllava.runtime.sampling_noise import uniform_noise


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters, on the logits' device, in batch order.

    `all_greedy` and `any_top_p` are host-known promises about the tensors (build() computes them):
    all_greedy means every temperature is 0 (no noise is made); any_top_p False means no sampled row
    has top_p < 1 (the B x V sort is skipped, so a top_p < 1 row would go unfiltered).
    """

    temperature: torch.Tensor  # (B,) fp32, >= 0; 0 is greedy
    top_p: torch.Tensor  # (B,) fp32 in (0, 1]
    seeds: torch.Tensor  # (B,) int64 in [0, 2**63)
    steps: torch.Tensor  # (B,) int64 >= 0: index of the token being generated within its request
    all_greedy: bool
    any_top_p: bool

    def rows(self, start: int, stop: int) -> "SamplingBatch":
        """Rows start..stop-1 (views; the host-known flags are the whole batch's, which stay
        true promises for any subset: a row with top_p == 1 is never filtered either way)."""
        return dataclasses.replace(self, temperature=self.temperature[start:stop],
                                   top_p=self.top_p[start:stop], seeds=self.seeds[start:stop],
                                   steps=self.steps[start:stop])

    @classmethod
    def greedy(cls, B: int, device) -> "SamplingBatch":
        """B greedy rows (temperature 0; seeds and steps unused). Callers may keep one per B: it
        holds no per-step data, so a greedy step needs no host→device copy at all."""
        zeros = torch.zeros(B, dtype=torch.int64, device=device)
        return cls(temperature=torch.zeros(B, device=device), top_p=torch.ones(B, device=device),
                   seeds=zeros, steps=zeros, all_greedy=True, any_top_p=False)

    @classmethod
    def build(cls, rows: list[tuple[float, float, int, int]], device) -> "SamplingBatch":
        """rows: (temperature, top_p, seed, step) per sequence, in batch order (one H2D copy)."""
        for i, (temperature, top_p, seed, step) in enumerate(rows):
            if not (temperature >= 0 and temperature != float("inf")):
                raise ValueError(f"rows[{i}]: temperature must be finite and >= 0, got {temperature!r}")
            if not 0 < top_p <= 1:
                raise ValueError(f"rows[{i}]: top_p must be in (0, 1], got {top_p!r}")
            if not (isinstance(seed, int) and 0 <= seed < 2**63):
                raise ValueError(f"rows[{i}]: seed must be an int in [0, 2**63), got {seed!r}")
            if not (isinstance(step, int) and 0 <= step < 2**63):
                raise ValueError(f"rows[{i}]: step must be an int in [0, 2**63), got {step!r}")
        B = len(rows)
        # One host buffer: int64 (seeds, steps) then fp32 (temperature, top_p), viewed as bytes so
        # a single copy moves all four; the int64 block comes first to keep both views aligned.
        ints = torch.tensor([[r[2] for r in rows], [r[3] for r in rows]], dtype=torch.int64)
        floats = torch.tensor([[r[0] for r in rows], [r[1] for r in rows]], dtype=torch.float32)
        host = torch.cat([ints.view(torch.uint8).reshape(-1), floats.view(torch.uint8).reshape(-1)])
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
        ints_d = buf[: 16 * B].view(torch.int64).view(2, B)
        floats_d = buf[16 * B:].view(torch.float32).view(2, B)
        return cls(
            temperature=floats_d[0], top_p=floats_d[1], seeds=ints_d[0], steps=ints_d[1],
            all_greedy=all(r[0] == 0 for r in rows),
            any_top_p=any(r[0] > 0 and r[1] < 1 for r in rows),
        )


class SamplingBatches:
    """Each step's SamplingBatch, reused where nothing but the step index changed.

    The rows of a step are sequences (`seq.params`, and the index of the token they generate:
    `len(seq.token_ids) - seq.prompt_len`). An all-greedy batch of B rows holds no per-step data:
    one per B, no copy. A batch of the same sequences as the previous call, in the same order,
    each one token further, is that call's batch with `steps` advanced by one on the device (one
    in-place add: no host lists, no validation, no copy; the previous step's sampler read the old
    values earlier in stream order). Anything else is built afresh (`SamplingBatch.build`)."""

    def __init__(self, device):
        self.device = device
        self._greedy: dict[int, SamplingBatch] = {}
        self._seqs: list = []                 # the previous call's rows ...
        self._next_steps: list[int] | None = None    # ... and their steps now (sampled only)
        self._batch: SamplingBatch | None = None
        self.any_logprobs = False             # some row of the latest batch asks for logprobs

    def get(self, seqs: list) -> SamplingBatch:
        batch = self._batch
        if batch is not None and seqs == self._seqs:
            if batch.all_greedy:
                return batch
            steps = [len(seq.token_ids) - seq.prompt_len for seq in seqs]
            if steps == self._next_steps:
                batch.steps.add_(1)
                self._next_steps = [step + 1 for step in steps]
                return batch
        self._batch = None                  # until the new one exists (build may raise)
        if all(seq.params.temperature == 0 for seq in seqs):
            batch = self._greedy.get(len(seqs))
            if batch is None:
                batch = self._greedy[len(seqs)] = SamplingBatch.greedy(len(seqs), self.device)
            self._next_steps = None
        else:
            steps = [len(seq.token_ids) - seq.prompt_len for seq in seqs]
            batch = SamplingBatch.build([(seq.params.temperature, seq.params.top_p,
                                          seq.params.seed, step)
                                         for seq, step in zip(seqs, steps)], self.device)
            self._next_steps = [step + 1 for step in steps]
        self._seqs, self._batch = list(seqs), batch
        self.any_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        return batch


def _check(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Host-side metadata checks only (shape, dtype, device): no tensor values are read."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be (B, V) float32, got {tuple(logits.shape)} {logits.dtype}")
    B = logits.shape[0]
    for name, dtype in (("temperature", torch.float32), ("top_p", torch.float32),
                        ("seeds", torch.int64), ("steps", torch.int64)):
        t = getattr(batch, name)
        if t.shape != (B,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"batch.{name} must be ({B},) {dtype} on {logits.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _top_p_drop(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                scratch: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: the tokens top-p drops from logits / temperature (transformers' TopPLogitsWarper:
    sort ascending, softmax, cumsum, drop mass <= 1 - top_p, keep the most likely; never in
    top_p == 1 rows). Overwrites `scratch` ((B, V) fp32). Each tensor is written once, into memory
    freed by a previous step where possible: peak 17 bytes per logit (the sort's values, int64 ids,
    scratch and the bool mask), instead of a new (B, V) tensor per op. The ids are what maps the
    drop back: comparing logits with a per-row threshold value instead would assume the dropped
    set is a prefix of the sorted order, true for the CPU's sequential cumsum but not for a
    parallel scan, whose partial sums can dip by an ulp (and tied values at the threshold split
    by id: the sort's id of the first kept token)."""
    torch.div(logits, temperature[:, None], out=scratch)
    # Stable sort: tied logits are ordered by id in every row, whatever the batch holds. On the
    # CPU it sorts scratch in place (row_sort.py: ~5x torch.sort's speed, the same order).
    sorted_logits, sorted_idx = stable_sort_rows_(scratch)
    spare = torch.empty_like(scratch) if sorted_logits.data_ptr() == scratch.data_ptr() else scratch
    probs = torch.softmax(sorted_logits, dim=-1, out=spare)
    # (B, V) ascending cumulative mass. On CUDA a per-row scan: torch.cumsum's varies with the
    # number of rows there, which would let the batch move a row's top-p threshold by an ulp.
    cum = (row_cumsum if probs.is_cuda else row_cumsum_ref)(probs, out=sorted_logits)
    drop_sorted = cum <= (1 - top_p)[:, None]
    del probs, cum, sorted_logits, spare
    drop_sorted[:, -1] = False  # always keep the most likely token
    drop_sorted &= (top_p < 1)[:, None]  # top_p == 1 rows are never filtered
    return torch.zeros_like(drop_sorted).scatter_(-1, sorted_idx, drop_sorted)


def race_scores(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(B, V) fp32 logits → (B, V) fp32 scores logits/T - log(E), -inf where top-p drops a token.

    argmax over a row is that row's sampled token. Greedy rows are scored with T = 1 (their result
    is replaced by the plain argmax in `sample`); exposed so tests can see how close a race was.
    The same fp32 ops as the straightforward form, run in place: peak ≈17 bytes per logit with
    top-p (the sort), ≈12 without (scores and the noise's two int32 tensors).
    """
    _check(logits, batch)
    greedy = batch.temperature == 0
    temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    scores = torch.empty_like(logits)
    drop = _top_p_drop(logits, temperature, batch.top_p, scores) if batch.any_top_p else None
    torch.div(logits, temperature[:, None], out=scores)  # the same fp32 division as the reference
    if drop is not None:
        scores.masked_fill_(drop, float("-inf"))
        del drop
    gumbel = uniform_noise(batch.seeds, batch.steps, logits.shape[1])
    # Gumbel form of the race: -log(E) with E = -log(u) in (6e-8, 16.7], so no log(0) or inf.
    return scores.sub_(gumbel.log_().neg_().log_())


# On a CPU the sampler's (B, V) passes run over blocks of rows whose working set (≈17 bytes per
# logit with top-p, see race_scores) fits in this many bytes, so each pass reads what the previous
# one wrote from the cache rather than from DRAM, and the step leaves the rest of the host's cache
# alone (the scheduler's and runner's data after it): at B = 64 x V = 64064 the whole batch would
# be ≈70 MB. Every op is row-wise, so the ids are the same for any blocking.
CPU_BLOCK_BYTES = 8 << 20


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits (B, V) fp32 → token ids (B,) int64, on logits.device, no host sync."""
    _check(logits, batch)
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    B, V = logits.shape
    rows = max(1, CPU_BLOCK_BYTES // (17 * V)) if logits.device.type == "cpu" else B
    if rows >= B:
        sampled_ids = race_scores(logits, batch).argmax(dim=-1)
    else:
        sampled_ids = torch.cat([race_scores(logits[i:i + rows], batch.rows(i, i + rows))
                                 .argmax(dim=-1) for i in range(0, B, rows)])
    return torch.where(batch.temperature == 0, greedy_ids, sampled_ids)


def sample_ref(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """One request's parameters for all B rows: logits (B, V) fp32 → ids (B,) int64.

    The plain reference (sort + cumsum + torch.multinomial with a torch.Generator); the tests use it
    as the distribution reference for `sample`.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator:
    """A torch.Generator for `sample_ref`: seeded when seed is given, else from OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def raw_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw distribution's log-probabilities, as vLLM returns them by default: an fp32
    log-softmax of the logits, before temperature and top-p (which only shape the draw).

    logits (B, V) fp32, token_ids (B,) int64 → (chosen (B,), top values (B, k), top ids (B, k)),
    top-k in descending order, ties to the lowest id (a stable sort). Separate from `sample`:
    only requests that ask for logprobs pay for it, and sampling itself is unchanged."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be (B, V) float32, got {tuple(logits.shape)} {logits.dtype}")
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, token_ids[:, None]).squeeze(-1)
    if top_k == 0:
        empty = logp[:, :0]
        return chosen, empty, empty.to(torch.int64)
    if top_k == 1:  # argmax: the first maximum, as the stable sort below would order it
        values, ids = logp.max(dim=-1, keepdim=True)
        return chosen, values, ids
    values, ids = torch.sort(logp, dim=-1, descending=True, stable=True)
    return chosen, values[:, :top_k], ids[:, :top_k]
