"""What bench/decode.py measures and what each measurement gives: the run's `Plan`, one table
`Row`, the row labels, and the step timer every row uses (engine, graph replay, peers)."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import torch

ENGINE, REPLAY = "fastllava engine", "fastllava graph replay"
OVERLAP = "fastllava overlapped loop"   # the engine thread's default loop (overlap_scheduling)
HF_EAGER, HF_COMPILED = "hf eager (DynamicCache)", "hf compiled (StaticCache, reduce-overhead)"


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    dtype: torch.dtype
    batches: tuple[int, ...]
    context: int                 # prompt tokens per sequence (cached when decoding starts)
    warmup: int
    steps: int                   # decode steps per timed window
    windows: int
    peers: tuple[str, ...]       # "eager", "compiled"
    tensor_parallel_size: int = 1    # fastllava rows only; the peers run on one device
    random_config: str = "tiny"      # the weights.random config name (the TP workers build it)
    # fastllava rows per (weights quantization, KV page dtype); the first is the model dtype's
    variants: tuple[tuple[str | None, str], ...] = ((None, "auto"),)

    @property
    def timed(self) -> int:
        return self.steps * self.windows

    @property
    def max_len(self) -> int:    # prompt + prefill token + (warm-up + timed steps) per engine
        return self.context + 2 * (max(self.warmup, 4) + self.timed) + 16   # row, with slack


@dataclasses.dataclass
class Row:
    impl: str
    B: int
    ctx: float | None = None     # mean context of the timed steps (tokens attended per sequence)
    ms: float | None = None
    tok_s: float | None = None
    gb_s: float | None = None
    pct: float | None = None     # of the copy ceiling
    vs: float | None = None      # this row's ms / the fastllava engine's ms (> 1: fastllava faster)
    variant: tuple[str | None, str] = (None, "auto")   # fastllava rows: (quantization, KV dtype)
    bar: str = ""
    note: str = ""


def time_steps(step, plan: Plan) -> float:
    """Median over plan.windows of wall-clock ms per step (synchronised at window edges)."""
    sync = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)
    times = []
    for _ in range(plan.windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(plan.steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / plan.steps)
    return statistics.median(times)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
