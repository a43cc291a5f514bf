"""Host work per engine step, model stubbed: serial vs overlapped loop (and today's main).

    python bench/host_overhead.py [--steps N] [--forward-us F] [--baseline-python PY] [--out DIR]
                                  [--smoke] [--stub-sampler] [--graphs] [--case SHAPE,B,MODE ...]

The real scheduler, block manager, input packing, sampler and event delivery run; the model is a
stub whose forward costs nothing and returns fp32 logits of the real vocabulary (random, fixed).
Cases: 13B-like (vocab 32064, contexts around 700 tokens) and 34B-like (vocab 64064, around 2000),
B = 1 / 16 / 64 running sequences, greedy and sampled (temperature 0.7, top_p 0.9); `--case
13b,1,greedy` (repeatable) runs only the cases named. Each case
first prefills its B prompts (not timed), then times `--steps` decode steps of the engine loop,
driven on this thread (`Engine._step` / `Engine._overlapped_step`), with every token delivered to
an event callback as the server's would be.

Phases (µs per step, mean): `schedule` (Scheduler.schedule), `pack` (the runner's launch minus the
forward and the sampler ops: flat inputs, block tables, sampling parameters, host copies),
`forward` (the stub: ~0), `sample` (the sampler's torch ops; on a GPU this is device work, so it
is not counted as host work), `update+deliver` (the rest of the step: scheduler bookkeeping,
events), `host` = schedule + pack + update+deliver.

Overlap, with a simulated device (`--forward-us F`, default 3000 µs ~ a 13B batch-1 decode on an
H200): the stub's forward queues F µs on a simulated stream clock and returns at once; reading a
step's ids waits until the clock passes it. The serial loop waits right after each launch, so its
step takes host + F; the overlapped loop packs step N+1 before waiting for step N, so its step
takes about max(host, F). `idle` = wall per step - F: the gap the device would sit idle per step.
On a real CUDA device the same happens with kernels instead of a clock (the torch ops here are
synchronous, so without the simulation the CPU run shows no overlap).

Like `build_engine`, each case freezes the start-up heap out of the cyclic GC (`freeze_heap`)
where the engine under test has it (today's main does not).

`--stub-sampler` (a diagnostic) times the steps with a stand-in for the sampler's torch ops that
reads 8 logits per row: the CPU sampler streams hundreds of MB per step at B = 64 (B x V sorts,
noise), which evicts the host's caches, so every host phase after it runs cold; on a GPU that
work is on the device and the host's caches stay warm. With the stand-in, the host phases are
the host's own cost (the sampling parameters are still built and reused as usual; the tokens
differ from the real sampler's). Sampled cases then run the full `--steps`. With `--graphs` the
decode graph's greedy argmax (a B x V pass as well) then sees only those 8 logits per row.

`--graphs` times the decode path a GPU serving loop takes: the runner decodes through
`DecodeGraphs(capture=False)`, which runs the padded static-buffer step the CUDA graphs capture,
eagerly (buckets = B, so no padding rows). `forward` is then the graph body (the stub's forward and
the greedy argmax, device work inside the decode graph on a GPU) and `sample` the sampler graph's
body; `pack` is the host work around the replays (inputs into the static buffers, block tables,
sampling parameters). Rows carry `decode` = graphs (eager otherwise).

`--baseline-python` runs the same cases with another interpreter (one whose `fastllava` is today's
main, e.g. /work/main/.venv/bin/python): its rows are `impl` = main-serial and main-overlap (or
`main` alone for an engine without the overlapped loop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastllava.runtime.cuda_graphs as cuda_graphs  # noqa: E402
import fastllava.runtime.model_runner as model_runner  # noqa: E402
from fastllava.runtime.block_manager import BlockManager  # noqa: E402
try:
    from fastllava.runtime.build import freeze_heap  # noqa: E402
except ImportError:                                   # today's main: no freeze
    freeze_heap = None
from fastllava.runtime.engine import Engine, RequestHandle  # noqa: E402
from fastllava.runtime.image_cache import ImageFeatureCache  # noqa: E402
from fastllava.runtime.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from fastllava.runtime.sequence import SamplingParams, Sequence  # noqa: E402

PAGE = 16
SHAPES = {"13b": (32064, 700), "34b": (64064, 2000)}     # vocab, context
SMOKE_SHAPES = {"13b": (512, 40), "34b": (1024, 70)}
PHASES = ("schedule", "pack", "forward", "sample", "update+deliver", "host")


class Clock:
    """A simulated device stream: work queued at launch, finished `forward_s` later."""

    def __init__(self, forward_s: float):
        self.forward_s, self.ready = forward_s, 0.0

    def launch(self) -> None:
        self.ready = max(time.perf_counter(), self.ready) + self.forward_s

    def wait(self, until: float | None = None) -> None:
        """Until the device reaches `until` (default: all queued work done)."""
        until = self.ready if until is None else until
        while time.perf_counter() < until:           # sleep most of it, spin the last 100 µs
            left = until - time.perf_counter()
            if left > 2e-4:
                time.sleep(left - 1e-4)


class StubModel:
    """Zero-cost forward: fixed random fp32 logits (rows, V), one row per logits row."""

    def __init__(self, vocab: int, rows: int, timers: dict, clock: Clock):
        self.logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
        self.timers, self.clock = timers, clock

    def embed(self, ids, mask, feats):
        return ids

    def __call__(self, ops, embeds, ctx, kv):
        t0 = time.thread_time()
        out = self.logits[: ctx.logits_rows.shape[0]]
        self.clock.launch()
        self.timers["forward"] += time.thread_time() - t0
        return out


class StubKV:
    def __init__(self, num_pages: int):
        self.k, self.page_size, self.num_pages = [torch.empty(0)], PAGE, num_pages


def timed(timers: dict, key: str, fn):
    def wrapper(*a, **kw):
        t0 = time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            timers[key] += time.thread_time() - t0
    return wrapper


def stub_sample(logits, params):
    """The --stub-sampler stand-in: ids from 8 logits per row (no B x V pass)."""
    return logits[:, :8].argmax(dim=-1)


def run_case(shape: str, B: int, sampled: bool, loop: str, steps: int, forward_us: float,
             smoke: bool, stub_sampler: bool = False, graphs: bool = False) -> dict:
    vocab, ctx = (SMOKE_SHAPES if smoke else SHAPES)[shape]
    timers = dict.fromkeys(("schedule", "launch", "forward", "replay", "sample", "wait",
                            "wait_cpu"), 0.0)
    clock = Clock(forward_us * 1e-6)
    max_len = ctx + 51 + steps + 8                       # every prompt + every timed step
    pages = B * (-(-max_len // PAGE)) + 8
    model = StubModel(vocab, B, timers, clock)
    if graphs and stub_sampler:
        # The decode graph's greedy argmax is a B x V pass too (device work on a GPU): with the
        # stand-in sampler the graph body sees the 8 logits per row the stand-in reads.
        model.logits = model.logits[:, :8].contiguous()
    kw = {"max_num_seqs": B} if loop != "main" else {}
    kv = StubKV(pages)
    decode = cuda_graphs.DecodeGraphs(model, None, kv, B, -(-max_len // PAGE), capture=False) \
        if graphs else None
    runner = model_runner.ModelRunner(model, None, kv, ImageFeatureCache(0), decode, **kw)
    budget = B * max_len                                  # prefill every prompt in one step
    sched = Scheduler(SchedulerConfig(B, budget, budget), BlockManager(pages, PAGE))
    engine = Engine(sched, runner, overlap=True) if loop == "overlap" else Engine(sched, runner)
    g = torch.Generator().manual_seed(1)
    delivered = []
    for i in range(B):
        n = ctx + (37 * i) % 101 - 50 if ctx > 100 else ctx      # contexts spread around ctx
        params = SamplingParams(max_tokens=10**6, temperature=0.7 if sampled else 0.0,
                                top_p=0.9 if sampled else 1.0, seed=i)
        seq = Sequence(torch.randint(0, vocab, (n,), generator=g).tolist(), params, max_len)
        engine._add(RequestHandle(seq, lambda kind, v: delivered.append(v)))
    step = engine._overlapped_step if loop == "overlap" else engine._step
    if freeze_heap is not None:          # as build_engine does after start-up (main does not)
        freeze_heap()
    for _ in range(4):                   # prefill (one step per budget) and settle into decode
        step()
    # Instrument after the prefill: schedule, launch/run, the sampler, and the device wait.
    sched.schedule = timed(timers, "schedule", sched.schedule)
    model_runner.sample = timed(timers, "sample", stub_sample if stub_sampler else SAMPLE)
    if graphs:    # the graph bodies: device work on a GPU (the stub's forward counts inside)
        cuda_graphs.sample = stub_sample if stub_sampler else SAMPLE
        decode._decode = timed(timers, "replay", decode._decode)
        decode._sample = timed(timers, "sample", decode._sample)
    if loop == "main":
        run = runner.run

        def serial_run(batch):          # today's run() reads the ids back: the device wait is here
            t0 = time.thread_time()
            out = run(batch)
            timers["launch"] += time.thread_time() - t0
            t0, c0 = time.perf_counter(), time.thread_time()
            clock.wait()
            timers["wait"] += time.perf_counter() - t0
            timers["wait_cpu"] += time.thread_time() - c0
            return out
        runner.run = serial_run
    else:
        launch = runner.launch

        def waiting_launch(batch):
            t0 = time.thread_time()
            out = launch(batch)
            timers["launch"] += time.thread_time() - t0
            tokens = out.tokens

            ready = clock.ready          # this step's end (a later launch moves the clock on)

            def wait_then_tokens():
                t1, c1 = time.perf_counter(), time.thread_time()
                clock.wait(ready)
                timers["wait"] += time.perf_counter() - t1
                timers["wait_cpu"] += time.thread_time() - c1
                return tokens()
            out.tokens = wait_then_tokens
            return out
        runner.launch = waiting_launch
    for k in list(timers):
        timers[k] = 0.0
    assert len(sched.running) == B and all(s.is_decoding for s in sched.running), sched.running
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    model_runner.sample = cuda_graphs.sample = SAMPLE
    us = {k: v / steps * 1e6 for k, v in timers.items()}
    if graphs:
        us["forward"] = us["replay"]
    row = {"schedule": us["schedule"], "forward": us["forward"], "sample": us["sample"],
           "pack": us["launch"] - us["forward"] - us["sample"]}
    # The wait spins its last 100 µs (CPU time): count the step's CPU time outside the wait.
    row["update+deliver"] = (cpu - timers["wait_cpu"]) / steps * 1e6 - us["schedule"] \
        - us["launch"]
    row["host"] = row["schedule"] + row["pack"] + row["update+deliver"]
    row["wall"] = wall / steps * 1e6
    row["idle"] = row["wall"] - forward_us
    assert len(delivered) >= B * steps - B, (len(delivered), B, steps)
    return row


SAMPLE = model_runner.sample


def cases(smoke: bool):
    for shape in SHAPES:
        for B in ((1, 4) if smoke else (1, 16, 64)):
            for sampled in (False, True):
                yield shape, B, sampled


def worker(args, case) -> list[dict]:
    """One case x every loop, best of --repeats (lowest host time; the loops interleaved)."""
    loops = ["overlap", "serial"] if hasattr(Engine, "_overlapped_step") else ["main"]
    out = []
    for shape, B, sampled in [case]:
        vocab = (SMOKE_SHAPES if args.smoke else SHAPES)[shape][0]
        steps = args.steps
        if sampled and not args.stub_sampler:  # the CPU sampler (B x V sort, noise) is slow
            steps = max(5, min(steps, int(steps * 32064 / (B * vocab))))
        # The simulated device only means something while the CPU sampler (device work on a
        # GPU) is small beside it: greedy rows and sampled batch 1.
        for forward_us in (0.0, args.forward_us) if not sampled or B == 1 else (0.0,):
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for loop in loops:
                    row = run_case(shape, B, sampled, loop, steps, forward_us, args.smoke,
                                   args.stub_sampler, args.graphs)
                    if loop not in best or row["host"] < best[loop]["host"]:
                        best[loop] = row
            for loop, row in best.items():
                out.append(dict(shape=shape, B=B, mode="sampled" if sampled else "greedy",
                                decode="graphs" if args.graphs else "eager",
                                forward_us=forward_us, impl=loop, steps=steps, **row))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--forward-us", type=float, default=3000.0)
    p.add_argument("--repeats", type=int, default=3, help="best of N per case and loop")
    p.add_argument("--baseline-python", help="an interpreter whose fastllava is today's main")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--smoke", action="store_true", help="tiny vocab/contexts, B = 1 / 4")
    p.add_argument("--stub-sampler", action="store_true",
                   help="diagnostic: a cache-neutral stand-in for the sampler's torch ops")
    p.add_argument("--case", action="append", metavar="SHAPE,B,MODE",
                   help="only these cases (e.g. 13b,1,greedy; repeatable); default: all")
    p.add_argument("--graphs", action="store_true",
                   help="decode through DecodeGraphs(capture=False): the graph path's host work")
    p.add_argument("--worker-json", help=argparse.SUPPRESS)     # shape,B,sampled: one case
    args = p.parse_args()
    if args.smoke:
        args.steps, args.forward_us, args.repeats = min(args.steps, 8), min(args.forward_us, 500.0), 1
    torch.set_num_threads(1)
    if args.worker_json:
        shape, B, sampled = args.worker_json.split(",")
        print(json.dumps(worker(args, (shape, int(B), sampled == "1"))))
        return
    from common import run_header, write_outputs
    load0 = os.getloadavg()[0]
    rows = []
    todo = list(cases(args.smoke))
    if args.case:
        named = {f"{shape},{B},{'sampled' if sampled else 'greedy'}": (shape, B, sampled)
                 for shape, B, sampled in todo}
        unknown = [c for c in args.case if c not in named]
        if unknown:
            p.error(f"--case {unknown}: not among the cases {sorted(named)}")
        picked = {named[c] for c in args.case}
        todo = [c for c in todo if c in picked]
    for shape, B, sampled in todo:     # each case: this engine, then the baseline
        rows += worker(args, (shape, B, sampled))
        if args.baseline_python:
            cmd = [args.baseline_python, os.path.abspath(__file__),
                   "--worker-json", f"{shape},{B},{int(sampled)}", "--steps", str(args.steps),
                   "--forward-us", str(args.forward_us), "--repeats", str(args.repeats)]
            cmd += ["--smoke"] if args.smoke else []
            cmd += ["--stub-sampler"] if args.stub_sampler else []
            cmd += ["--graphs"] if args.graphs else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": ""})
            for row in json.loads(done.stdout.strip().splitlines()[-1]):
                row["impl"] = "main" if row["impl"] == "main" else f"main-{row['impl']}"
                rows.append(row)
    header = run_header(sys.argv, "cpu")
    header.update(gpu=f"cpu: {platform.processor() or platform.machine()} (no GPU; stub model)",
                  threads="1 (torch.set_num_threads)", cores=str(os.cpu_count()),
                  load=f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after",
                  steps=str(args.steps),
                  decode="DecodeGraphs(capture=False): the CUDA-graph path's host work (--graphs)"
                  if args.graphs else "eager (ModelRunner without graphs)",
                  sampler="stand-in, 8 logits per row (--stub-sampler: host phases without the "
                          "CPU sampler's cache eviction)" if args.stub_sampler else "real")
    order = {"main": 0, "main-serial": 1, "main-overlap": 2, "serial": 3, "overlap": 4}
    rows.sort(key=lambda r: (r["forward_us"], r["shape"], r["B"], r["mode"], order[r["impl"]]))
    cols = ("shape", "B", "mode", "decode", "forward_us", "impl", "steps", *PHASES, "wall",
            "idle")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.0f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    text = (f"# Host overhead per engine step (stub model)\n\n{meta}\n\n"
            "µs per decode step, mean over `steps` steps, best of "
            f"{args.repeats} runs (lowest host). Phases in thread CPU time (robust to other load "
            "on the machine), wall and idle in wall time. host = schedule + pack + "
            "update+deliver (sample = the sampler's torch ops, device work on a GPU). "
            "forward_us > 0: simulated device time per step; idle = wall - forward_us.\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    for path in write_outputs(args.out, "host_overhead", header, text, cols,
                              [[r[c] for c in cols] for r in rows]):
        print("wrote", path)


if __name__ == "__main__":
    main()
