"""Serving benchmark: one seeded workload of image + prompt requests through the public API, sent
one at a time (`sequential`), all at once from N threads (`concurrent`) and optionally as Poisson
arrivals (`rate`), on the same loaded engine.

    python bench/serving.py [--model PATH] [--device D] [--dtype T] [--backend B]
                            [--requests N] [--seed S] [--rate R] [--no-cache] [--out DIR]
                            [--smoke]

Every number is measured on the client from `LLaVA.stream_detailed(request, every_token=True)`
events: TTFT = first event with completion_tokens >= 1 minus the submit time; ITL = the gap between
successive completion_tokens increments, divided by the increment (one sample per token); e2e =
last event minus submit. Queue time and prefix-cache hits come from the final event's "metrics"
when the engine reports them. Greedy and seeded-sampled outputs must be identical in every mode
(batch invariance): otherwise a MISMATCH line is printed and the exit status is 1.
Without --model, a tiny random LLaVA-NeXT checkpoint is built with tests/tiny.py in a temp dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, fmt, run_header, write_outputs

from fastllava.benchmarks.stats import percentile

WORDS = ("what is in this image describe the picture in detail which color is the car how many "
         "people are there left right top bottom near far small large red blue green sky tree "
         "house street dog cat person water light dark shape answer briefly please").split()
TINY_MODEL = "tiny random LLaVA-NeXT (tests/tiny.py Spec(kind='next', num_kv_heads=2))"
# CSV column → markdown heading, in table order.
HEADS = {"mode": "mode", "requests": "requests", "wall_s": "wall s", "req_per_s": "req/s",
         "out_tok_per_s": "out tok/s", **{f"{m}_p{q}_ms": f"{m.upper()} p{q} ms"
                                          for m in ("ttft", "itl") for q in (50, 90, 99)},
         "e2e_p50_ms": "e2e p50 ms", "e2e_p99_ms": "e2e p99 ms", "queue_mean_ms": "queue mean ms",
         "cached_prompt_tokens": "cached prompt tok", "speedup_vs_sequential": "req/s vs sequential"}
COLUMNS = tuple(HEADS)


@dataclasses.dataclass
class Trace:
    """One request seen from the client: perf_counter() at submit, (time, completion_tokens) at
    every event, the final event (it may carry "metrics"), or the error that ended it."""
    submit: float
    events: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    final: dict | None = None
    error: str = ""


def write_image(rng: random.Random, path: Path, lo: int, hi: int) -> None:
    """Random RGB noise, W and H each uniform in [lo, hi] (varied anyres grids), as a PNG."""
    from PIL import Image
    w, h = rng.randint(lo, hi), rng.randint(lo, hi)
    Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(path)


def build_workload(seed: int, n: int, smoke: bool, img_dir: Path) -> list[dict]:
    """n fal-schema requests. n // 6 images are used by two requests each (about a third of the
    requests share an image, which a prefix cache can reuse); a quarter of the requests sample
    (temperature 0.7 / 1.0 with a seed), the rest are greedy."""
    rng = random.Random(seed)
    pairs = n // 6
    images = [i for i in range(pairs) for _ in (0, 1)] + list(range(pairs, n - pairs))
    rng.shuffle(images)
    for i in range(n - pairs):
        write_image(rng, img_dir / f"img{i}.png", 24, 160 if smoke else 480)
    sampled = set(rng.sample(range(n), max(1, n // 4)))
    # max_tokens spread around the fal schema's default of 64 (the tiny random model seldom meets
    # an eos id, so outputs run to max_tokens).
    max_tokens, words = ((4, 12), (3, 16)) if smoke else ((16, 112), (3, 60))
    workload = []
    for i in range(n):
        req = {"image_url": str(img_dir / f"img{images[i]}.png"),
               "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))),
               "max_tokens": rng.randint(*max_tokens), "temperature": 0.0, "top_p": 1.0}
        if i in sampled:
            req.update(temperature=rng.choice((0.7, 1.0)), top_p=rng.choice((0.9, 1.0)),
                       seed=rng.randrange(1 << 31))
        workload.append(req)
    return workload


def run_one(llava, request: dict) -> Trace:
    trace = Trace(time.perf_counter())
    try:
        for event in llava.stream_detailed(request, every_token=True):
            trace.events.append((time.perf_counter(), event["completion_tokens"]))
            trace.final = event
        if not any(c >= 1 for _, c in trace.events):
            trace.error = f"no token generated; final event {trace.final}"
    except Exception as exc:  # noqa: BLE001 - reported per request, the run goes on
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


def run_threads(llava, workload: list[dict], offsets: list[float]) -> list[Trace]:
    """One thread per request, released together; request i is submitted offsets[i] s after."""
    traces: list[Trace | None] = [None] * len(workload)
    go, start = threading.Event(), []

    def client(i: int) -> None:
        go.wait()
        time.sleep(max(0.0, start[0] + offsets[i] - time.perf_counter()))
        traces[i] = run_one(llava, workload[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(workload))]
    for t in threads:
        t.start()
    start.append(time.perf_counter())
    go.set()
    for t in threads:
        t.join()
    return traces


def summarize(mode: str, traces: list[Trace]) -> dict:
    """The mode's row (ms for latencies); requests that failed are left out of every figure."""
    ok = [t for t in traces if not t.error]
    ttft, itl, e2e, queue, cached = [], [], [], [], []
    for t in ok:
        ttft.append(next(ts for ts, c in t.events if c >= 1) - t.submit)
        prev_ts, prev_c = 0.0, 0
        for ts, c in t.events:
            if c > prev_c:
                if prev_c >= 1:   # several tokens in one event: the gap is shared among them
                    itl += [(ts - prev_ts) / (c - prev_c)] * (c - prev_c)
                prev_ts, prev_c = ts, c
        e2e.append(t.events[-1][0] - t.submit)
        metrics = t.final.get("metrics")
        if metrics:
            queue.append(metrics["queue_s"])
            cached.append(metrics["cached_prompt_tokens"])
    wall = max(t.events[-1][0] for t in ok) - min(t.submit for t in ok) if ok else math.nan
    tokens = sum(t.final["completion_tokens"] for t in ok)
    row = {"mode": mode, "requests": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
           "out_tok_per_s": tokens / wall,
           "queue_mean_ms": 1e3 * sum(queue) / len(queue) if queue else None,
           "cached_prompt_tokens": sum(cached) if cached else None}
    for name, xs, qs in (("ttft", ttft, (50, 90, 99)), ("itl", itl, (50, 90, 99)),
                         ("e2e", e2e, (50, 99))):
        for q in qs:
            row[f"{name}_p{q}_ms"] = 1e3 * percentile(xs, q)
    return row


def mismatches(workload: list[dict], ref: list[Trace], got: list[Trace], mode: str) -> list[str]:
    """A MISMATCH line per request whose output or token count differs from sequential's."""
    lines = []
    for i, (req, a, b) in enumerate(zip(workload, ref, got, strict=True)):
        if a.error or b.error:
            continue
        pair = [(e["output"], e["completion_tokens"]) for e in (a.final, b.final)]
        if pair[0] != pair[1]:
            kind = "greedy" if req["temperature"] == 0 else f"sampled seed {req['seed']}"
            lines.append(f"MISMATCH {mode} vs sequential: request {i} ({kind}): sequential "
                         f"{pair[0][0]!r} ({pair[0][1]} tokens) vs {mode} {pair[1][0]!r} "
                         f"({pair[1][1]} tokens)")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADS.values()) + " |", "|" + "---|" * len(HEADS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu: {names[0] if names else 'unknown model'}"


def short_commit() -> str:
    """`git rev-parse --short HEAD`, + "-dirty" when tracked files are modified."""
    def git(*args: str) -> str:
        return subprocess.run(("git", *args), cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return (git("rev-parse", "--short", "HEAD") or "unknown") + (
            "-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load(args, tmp: Path):
    """The engine; --no-cache turns off prefix caching and the image-feature cache."""
    from fastllava import LLaVA
    kwargs = {"backend": args.backend}
    if args.no_cache:
        from fastllava.runtime.config import RuntimeConfig
        kwargs["runtime"] = RuntimeConfig(prefix_caching=False, image_cache_rows=0)
    path = args.model
    if not path:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import tiny
        path = tiny.build(tiny.Spec(kind="next", num_kv_heads=2), tmp / "tiny-next")
    return LLaVA.from_pretrained(path, args.device, args.dtype, **kwargs)


def cache_note(llava, args) -> str:
    """Empty the caches before a mode when the API can (so no mode reuses another's prefixes)
    and say what was done: otherwise later modes hit what earlier ones cached."""
    if args.no_cache:
        return "caches: prefix caching and the image-feature cache off (--no-cache)"
    reset = getattr(llava, "reset_prefix_cache", None)
    if reset is not None:
        reset()
        return "caches: emptied before each mode (LLaVA.reset_prefix_cache)"
    return ("caches: NOT emptied between modes (the API has no reset_prefix_cache): later modes "
            "reuse the prefixes and image features earlier modes cached (see cached prompt tok); "
            "--no-cache compares the modes without caches")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random LLaVA-NeXT)")
    parser.add_argument("--device", help="cuda / cpu (default: CUDA when available)")
    parser.add_argument("--dtype", help="float32 / float16 / bfloat16 (default: the API's)")
    parser.add_argument("--backend", default="auto", help="auto / torch / triton")
    parser.add_argument("--requests", type=int, help="workload size (default 32; --smoke 8)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--rate", type=float, help="also run Poisson arrivals at R requests/s")
    parser.add_argument("--no-cache", action="store_true",
                        help="run without prefix caching and the image-feature cache")
    parser.add_argument("--out", help="folder for serving-<device>-<date>.md and .csv")
    parser.add_argument("--smoke", action="store_true", help="8 short requests (CI plumbing)")
    args = parser.parse_args(argv[1:])
    n = args.requests or (8 if args.smoke else 32)
    if n < 1 or (args.rate is not None and args.rate <= 0):
        parser.error(f"--requests must be >= 1 and --rate > 0, got {n} and {args.rate}")
    with tempfile.TemporaryDirectory(prefix="fastllava-serving-") as tmp:
        tmp = Path(tmp)
        llava = load(args, tmp)
        (tmp / "img").mkdir()
        workload = build_workload(args.seed, n, args.smoke, tmp / "img")
        # Warm-up outside the workload (own image and prompt: nothing of it is cached for the
        # workload): one request alone, then a burst of 4, so lazy compilation of batched
        # shapes is not timed either.
        write_image(random.Random(-1), tmp / "warm.png", 64, 64)
        warm = {"image_url": str(tmp / "warm.png"), "prompt": "warm up", "max_tokens": 4,
                "temperature": 0.0}
        run_one(llava, warm)
        run_threads(llava, [warm] * 4, [0.0] * 4)
        note = cache_note(llava, args)
        modes = {"sequential": [run_one(llava, req) for req in workload]}
        cache_note(llava, args)
        modes["concurrent"] = run_threads(llava, workload, [0.0] * n)
        if args.rate:
            arrivals, t = random.Random(args.seed + 1), 0.0
            offsets = [t := t + arrivals.expovariate(args.rate) for _ in range(n)]
            cache_note(llava, args)
            modes[f"rate {args.rate:g}/s"] = run_threads(llava, workload, offsets)
        getattr(llava, "close", lambda: None)()   # stops the runtime's engine thread
    rows = [summarize(mode, traces) for mode, traces in modes.items()]
    for r in rows:
        r["speedup_vs_sequential"] = r["req_per_s"] / rows[0]["req_per_s"]
    errors = [f"ERROR {mode}: request {i}: {t.error}" for mode, traces in modes.items()
              for i, t in enumerate(traces) if t.error]
    bad = [line for mode, traces in list(modes.items())[1:]
           for line in mismatches(workload, modes["sequential"], traces, mode)]
    header = run_header(argv, llava.device.type)   # date, versions, command
    del header["gpu"], header["commit"]   # replaced: CPU model name too, short commit + "-dirty"
    header = {"device": device_name(llava.device), "commit": short_commit(), **header,
              "model": args.model or TINY_MODEL, "dtype": str(llava.dtype).removeprefix("torch."),
              "backend": getattr(llava.ops, "name", args.backend)}
    text = report(header, workload, modes, rows, [note, *bad, *errors], args.seed)
    print(text)
    if args.out:
        print("wrote", ", ".join(write_outputs(args.out, "serving", header, text, COLUMNS,
                                                   [[r[c] for c in COLUMNS] for r in rows])))
    if bad:
        print(f"MISMATCH: {len(bad)} request(s) differ between modes (see above)", file=sys.stderr)
    return 1 if bad or errors else 0


def report(header: dict, workload: list[dict], modes: dict[str, list[Trace]], rows: list[dict],
           notes: list[str], seed: int) -> str:
    """The markdown report: run record, workload, the mode table, then cache / check lines."""
    n, greedy = len(workload), sum(r["temperature"] == 0 for r in workload)
    prompt = [t.final["prompt_tokens"] for t in modes["sequential"] if not t.error]
    max_tokens = [r["max_tokens"] for r in workload]
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    work = (f"{n} requests (seed {seed}): {2 * (n // 6)} share an image pairwise; {greedy} "
            f"greedy, {n - greedy} sampled with a seed; max_tokens {min(max_tokens)}.."
            f"{max(max_tokens)}; prompt tokens (image included) {min(prompt, default=0)}.."
            f"{max(prompt, default=0)}")
    if not any(line.startswith(("MISMATCH", "ERROR")) for line in notes):
        notes.append(f"batch invariance: all {n} outputs identical across {', '.join(modes)} "
                     f"({greedy} greedy, {n - greedy} sampled with a seed)")
    return (f"# Serving benchmark\n\n{meta}\n- workload: {work}\n\n{markdown(rows)}\n\n"
            + "\n".join(notes) + "\n")

if __name__ == "__main__":
    sys.exit(main(sys.argv))
