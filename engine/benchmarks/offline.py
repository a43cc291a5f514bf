"""`fastllava bench latency` and `bench throughput`: the engine in this process, no HTTP.

Default: random weights at a real checkpoint's shapes (`--config`, fastllava.weights.random:
no download) driven at the runtime level, `schedule → runner.run → update`, with random prompt
token ids of `--input-len` tokens (the length an image + question has; a text-only prefill of
the same length costs the same in the decoder, the vision tower is not timed) and greedy decoding
of exactly `--output-len` tokens (no stop id). `--model PATH` instead loads a checkpoint and goes
through the public Python API (`LLaVA.stream_detailed`) with a generated image, vision included.
`--tiny`: a tiny random config on the CPU in seconds (plumbing only; times mean nothing).

latency: one request at a time, `--iters` times after `--warmup`: TTFT (submit → first token),
decode tok/s ((tokens - 1) / (last - first token)), e2e; p50/p90/p99 over the iterations.
throughput: `--num-prompts` requests submitted at once (offline batch): requests/s, output
tokens/s and total (prompt + output) tokens/s over the wall time.
`--kv-cache-dtype fp8`: the same runs again over an fp8 KV cache, a "fastllava (fp8 KV)" row
beside the model-dtype one in the same results.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from pathlib import Path

from fastllava.benchmarks import plots, stats
from fastllava.benchmarks.record import Results, default_out, provenance


def add_parsers(sub) -> None:
    for name, help_ in (("latency", "single-request TTFT and decode tok/s, in-process"),
                        ("throughput", "offline batch throughput through the engine, in-process")):
        p = sub.add_parser(name, help=help_, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        a = p.add_argument
        a("--config", default="llava-1.5-13b", help="random weights at this checkpoint's shapes "
          "(fastllava.weights.random.REAL_CONFIGS; default llava-1.5-13b)")
        a("--model", help="a checkpoint folder or hub id instead (through the Python API)")
        a("--tiny", "--smoke", dest="tiny", action="store_true",
          help="tiny random model on the CPU, short lengths: finishes in seconds")
        a("--device", help="cuda / cpu (default: cuda when available)")
        a("--dtype", help="float32 / float16 / bfloat16 (default bf16 on CUDA, fp32 on CPU)")
        a("--backend", default="auto", help="kernel backend: auto / torch / triton")
        a("--input-len", type=int, default=600, help="prompt tokens (default 600 ≈ LLaVA-1.5 image "
          "+ question; --tiny 24)")
        a("--output-len", type=int, default=128, help="generated tokens (default 128; --tiny 8)")
        a("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
        a("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
          help="fp8: also run over fp8 KV pages, a row beside the model dtype's (default auto)")
        if name == "latency":
            a("--iters", type=int, default=10, help="timed requests (default 10; --tiny 3)")
            a("--warmup", type=int, default=2, help="untimed requests first (default 2)")
            a("--peers", default="none", help="also time transformers on the same prompts and "
              "random weights: eager, compiled (StaticCache + torch.compile, GPU) or both, "
              "comma-separated (default none; needs transformers)")
        else:
            a("--num-prompts", type=int, default=64, help="requests in the batch (default 64; "
              "--tiny 8)")
        a("--out", type=Path, help=f"results folder (default ./bench-results/{name}-<UTC time>)")
        p.set_defaults(handler=run, mode=name)


def _sizes(args) -> None:
    if args.tiny:
        args.input_len = 24 if args.input_len == 600 else args.input_len
        args.output_len = 8 if args.output_len == 128 else args.output_len
        if args.mode == "latency":
            args.iters, args.warmup = (3 if args.iters == 10 else args.iters), min(args.warmup, 1)
        else:
            args.num_prompts = 8 if args.num_prompts == 64 else args.num_prompts
    if min(args.input_len, args.output_len) < 1:
        raise ValueError("--input-len and --output-len must be >= 1")


class RandomEngine:
    """A runtime engine over random weights (config: a REAL_CONFIGS key, None for the tiny
    config), stepped on the caller's thread. Also used by bench/test_components.py."""

    def __init__(self, config: str | None, *, device: str | None = None, dtype: str | None = None,
                 backend: str = "auto", max_len: int, max_seqs: int = 1, seed: int = 0,
                 kv_cache_dtype: str = "auto"):
        import torch

        from fastllava.kernels.ops import get_ops
        from fastllava.runtime.build import build_engine
        from fastllava.runtime.config import RuntimeConfig
        from fastllava.weights.random import REAL_CONFIGS, TINY_CONFIG, llava_config, random_model

        if config is not None and config not in REAL_CONFIGS:
            raise ValueError(f"--config {config!r}: known {', '.join(sorted(REAL_CONFIGS))}")
        device = device or ("cuda" if torch.cuda.is_available() and config else "cpu")
        if device == "cpu" and config is not None:
            raise ValueError(f"random {config} weights need a GPU (none here, or --device cpu): "
                             "pass --tiny for the CPU plumbing run, or --model")
        self.dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if device == "cuda" else torch.float32)
        self.name = f"{config}, random weights" if config else "tiny random (--tiny)"
        self.config = llava_config(REAL_CONFIGS[config] if config else TINY_CONFIG)
        self.vocab, self.device, self.max_len = self.config.text.vocab_size, device, max_len
        self.model = random_model(self.config, device, self.dtype, seed=seed)
        rc = RuntimeConfig(max_num_seqs=min(max_seqs, 256), max_context=max_len,
                           kv_cache_tokens=None if device == "cuda" else max_len * max_seqs,
                           kv_cache_dtype=kv_cache_dtype)
        self.engine, _ = build_engine(self.model, get_ops(backend, device), self.config.text,
                                      self.dtype, device, rc)

    def close(self) -> None:
        """Free the model and KV pool (before a peer model is built); idempotent."""
        import torch

        if self.model is None:
            return
        self.engine.shutdown()
        self.engine = self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def run(self, prompts: list[list[int]], output_len: int, bar=None) -> list[stats.Trace]:
        """All prompts added at once; per sequence the time of each generated token. bar: a
        progress_bar, advanced per finished request."""
        import torch

        from fastllava.runtime.sequence import SamplingParams, Sequence

        sched, runner = self.engine.scheduler, self.engine.runner
        params = SamplingParams(max_tokens=output_len, temperature=0.0, stop_ids=())
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        seqs = [Sequence(p, params, self.max_len) for p in prompts]
        traces = {s.seq_id: stats.Trace(time.perf_counter()) for s in seqs}
        for s in seqs:
            sched.add(s)
        live = {s.seq_id: s for s in seqs}
        while live:
            batch = sched.schedule()
            if batch is None:
                raise RuntimeError(f"the scheduler stalled with {len(live)} requests left")
            finished = sched.update(batch, runner.run(batch))
            sync()
            now = time.perf_counter()
            for s in batch.seqs:
                t = traces[s.seq_id]
                t.events += [now] * (s.num_generated - len(t.events))
            for s in finished:
                runner.release(s)
                traces[s.seq_id].end, traces[s.seq_id].tokens = now, s.num_generated
                live.pop(s.seq_id, None)
                if bar is not None:
                    bar.update(1)
        return list(traces.values())

    def prompts(self, rng: random.Random, n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(self.vocab) for _ in range(length)] for _ in range(n)]


class ApiEngine:
    """A checkpoint through the public API; each request on its own thread, a generated image."""

    def __init__(self, args, kv_cache_dtype: str = "auto"):
        from fastllava.api import LLaVA
        from fastllava.benchmarks.workload import generated_image

        self.llava = LLaVA.from_pretrained(args.model, args.device, args.dtype,
                                           backend=args.backend, progress=True,
                                           kv_cache_dtype=kv_cache_dtype)
        self.name, self.dtype = args.model, self.llava.dtype
        self.image = generated_image(random.Random(args.seed), 672, 672, "jpeg")

    def close(self) -> None:
        self.llava.close()   # stops the runtime's engine thread

    def prompts(self, rng: random.Random, n: int, length: int) -> list[str]:
        words = "describe the image in detail what is shown where why how".split()
        return [" ".join(rng.choice(words) for _ in range(max(1, length // 2))) for _ in range(n)]

    def run(self, prompts: list[str], output_len: int, bar=None) -> list[stats.Trace]:
        traces = [stats.Trace(0.0) for _ in prompts]

        def one(i: int) -> None:
            t = traces[i]
            t.submit = time.perf_counter()
            req = {"image_url": self.image, "prompt": prompts[i], "max_tokens": output_len}
            try:
                for ev in self.llava.stream_detailed(req, every_token=True):
                    t.events += [time.perf_counter()] * (ev["completion_tokens"] - len(t.events))
                    t.tokens = ev["completion_tokens"]
                t.end = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - reported per request
                t.error = f"{type(exc).__name__}: {exc}"[:200]
            if bar is not None:
                bar.update(1)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return traces


def _engine(args, kv_cache_dtype: str):
    if args.model:
        return ApiEngine(args, kv_cache_dtype)
    return RandomEngine(None if args.tiny else args.config, device=args.device, dtype=args.dtype,
                        backend=args.backend, max_len=args.input_len + args.output_len + 1,
                        max_seqs=1 if args.mode == "latency" else args.num_prompts,
                        seed=args.seed, kv_cache_dtype=kv_cache_dtype)


def run(args) -> int:
    from fastllava.weights.progress import progress_bar

    _sizes(args)
    _peer_kinds(args)   # bad --peers: refused before anything loads
    kv_dtypes = ("auto", "fp8") if args.kv_cache_dtype == "fp8" else ("auto",)
    results = Results(args.out or default_out(args.mode), f"{args.mode.capitalize()} benchmark",
                      provenance(args.argv))
    rows, series, all_traces, prompts = [], {}, [], None
    for kv in kv_dtypes:   # one engine at a time: the same prompts over each KV page dtype
        engine = _engine(args, kv)
        label = "fastllava" + (" (fp8 KV)" if kv == "fp8" else "")
        if prompts is None:
            n = args.warmup + args.iters if args.mode == "latency" else args.num_prompts
            prompts = engine.prompts(random.Random(args.seed), n, args.input_len)
            results.record.update(model=engine.name,
                                  dtype=str(engine.dtype).removeprefix("torch."),
                                  input_len=str(args.input_len), output_len=str(args.output_len),
                                  kv_cache_dtype=" and ".join(kv_dtypes))
        if args.mode == "latency":
            for prompt in prompts[:args.warmup]:
                engine.run([prompt], args.output_len)
            bar, traces = progress_bar(args.iters, f"latency {label}", "request"), []
            for prompt in prompts[args.warmup:]:
                traces += engine.run([prompt], args.output_len)
                bar.update(1)
            bar.close()
            rows.append({"impl": label, **_latency_row(traces)})
            series[f"{label} TTFT"] = [1e3 * t.ttft for t in traces if not t.error]
            if kv == "auto":
                for name, got in _peers(args, engine, prompts).items():
                    rows.append({"impl": name, **(_latency_row(got) if isinstance(got, list)
                                                  else {"note": got})})
                    series[f"{name} TTFT"] = ([1e3 * t.ttft for t in got]
                                              if isinstance(got, list) else [])
        else:
            engine.run(prompts[:1], 2)   # warm-up: lazy compilation out of the timed batch
            bar = progress_bar(len(prompts), f"throughput {label}", "request")
            traces = engine.run(prompts, args.output_len, bar)
            bar.close()
            row = {"impl": label, **stats.summarize(traces, {})}
            row["total_tok_per_s"] = ((row["out_tokens"] or 0) + args.input_len * row["ok"]) \
                / row["wall_s"]
            rows.append(row)
            series[f"{label} TTFT"] = [1e3 * t.ttft for t in traces if not t.error]
            series[f"{label} e2e"] = [1e3 * (t.end - t.submit) for t in traces if not t.error]
        all_traces += traces
        engine.close()
    if args.mode == "latency":
        for r in rows:   # > 1: fastllava (model-dtype KV) is faster
            for key, faster in (("ttft_p50_ms", lambda a, b: b / a),
                                ("decode_tok_per_s_p50", lambda a, b: a / b)):
                ours, theirs = rows[0].get(key), r.get(key)
                r[f"fastllava_x_{key.split('_')[0]}"] = faster(ours, theirs) if ours and theirs else None
        if not args.model:
            _roofline(rows, engine, args)
        results.add("Single request", rows, _LATENCY_COLUMNS)
        fig = plots.cdf(results.out / "latency_cdf.png", "Single-request TTFT", "ms", series)
    else:
        cols = ["impl", "requests", "ok", "errors", "wall_s", "req_per_s", "out_tokens",
                "out_tok_per_s", "total_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
                "e2e_p99_ms"]
        results.add("Offline batch", rows, cols)
        fig = plots.cdf(results.out / "throughput_cdf.png", "Offline batch: per-request latency",
                        "ms", series)
    results.figures += [fig] if fig else []
    results.notes += [] if fig else [plots.NO_MATPLOTLIB]
    results.notes += [f"request failed: {t.error}" for t in all_traces if t.error][:5]
    for path in results.write():
        print(f"wrote {path}")
    print(f"\n{(results.out / 'report.md').read_text()}")
    return 1 if any(t.error for t in all_traces) else 0


_LATENCY_COLUMNS = ("impl", "iters", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
                    "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms", "decode_tok_per_s_p50", "out_tokens",
                    "decode_gb_s", "pct_copy", "fastllava_x_ttft", "fastllava_x_decode", "note")


def _roofline(rows: list[dict], engine, args) -> None:
    """Decode as a ratio to the ceiling (docs/performance.md): GB/s = bytes a batch-1 step reads
    (weights once + the KV at the mean context) x steps/s, over a 1 GiB copy measured now (CUDA
    only: a CPU run has no ceiling here)."""
    from fastllava.benchmarks.common import copy_ceiling, step_bytes

    copy = copy_ceiling().value if engine.device == "cuda" else None
    ctx = args.input_len + args.output_len / 2
    for r in rows:
        if r.get("decode_tok_per_s_p50"):
            kv_e = 1 if r["impl"].endswith("(fp8 KV)") else None   # fp8 pages: 1 byte
            per_step = step_bytes(engine.config.text, 1, ctx, engine.dtype.itemsize, None, kv_e)
            r["decode_gb_s"] = per_step * r["decode_tok_per_s_p50"] / 1e9
            r["pct_copy"] = 100 * r["decode_gb_s"] / copy if copy else None


def _peer_kinds(args) -> list[str]:
    peers = [k for k in getattr(args, "peers", "none").split(",") if k and k != "none"]
    if set(peers) - {"eager", "compiled"}:
        raise ValueError(f"--peers takes eager, compiled or none, got {args.peers!r}")
    if peers and args.model:
        raise ValueError("--peers compares random weights; it cannot be used with --model")
    return peers


def _peers(args, engine, prompts) -> dict:
    from fastllava.benchmarks.peers import peer_latency

    peers = _peer_kinds(args)
    return peer_latency(engine, peers, prompts, args.output_len, args.warmup) if peers else {}


def _latency_row(traces: list[stats.Trace]) -> dict:
    ok = [t for t in traces if not t.error]
    decode = [(t.tokens - 1) / (t.events[-1] - t.events[0]) for t in ok
              if t.tokens and t.tokens > 1 and t.events[-1] > t.events[0]]
    row: dict = {"iters": len(traces), "errors": len(traces) - len(ok)}
    for name, xs in (("ttft", [t.ttft for t in ok]), ("e2e", [t.end - t.submit for t in ok])):
        for q in stats.QUANTILES:
            row[f"{name}_p{q}_ms"] = 1e3 * stats.percentile(xs, q)
    row["decode_tok_per_s_p50"] = stats.percentile(decode, 50)
    row["out_tokens"] = ok[0].tokens if ok else None
    return row
