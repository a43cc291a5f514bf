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
`--peers eager,compiled`: transformers on the same random weights and prompts (peers.py), and
every figure as a ratio to the copy / matmul ceilings measured in the same run (roofline.py).
`--kv-cache-dtype fp8`: the same runs again over an fp8 KV cache, a "fastllava (fp8 KV)" row
beside the model-dtype one in the same results.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from fastllava.benchmarks import plots, roofline, stats
from fastllava.benchmarks.engines import ApiEngine, RandomEngine
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
        a("--tensor-parallel-size", type=int, default=1, metavar="N",
          help="split fastllava's decoder over N GPUs (ranks; CPU processes with --tiny); "
          "transformers peers stay on one (default 1)")
        a("--peers", default="none", help="also time transformers' LlamaForCausalLM on the same "
          "prompts and random weights: eager, compiled (StaticCache + torch.compile "
          "reduce-overhead, GPU) or both, comma-separated (default none; needs transformers)")
        a("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
          help="fp8: also run over fp8 KV pages, a row beside the model dtype's (default auto)")
        if name == "latency":
            a("--iters", type=int, default=10, help="timed requests (default 10; --tiny 3)")
            a("--warmup", type=int, default=2, help="untimed requests first (default 2)")
        else:
            a("--num-prompts", type=int, default=64, help="requests in the batch (default 64; "
              "--tiny 8)")
            a("--peer-batch-size", type=int, default=16, help="--peers: prompts per transformers "
              "generate call, left-padded, batches in order (default 16; at most --num-prompts)")
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
    if args.mode == "throughput" and min(args.num_prompts, args.peer_batch_size) < 1:
        raise ValueError("--num-prompts and --peer-batch-size must be >= 1")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")


def _engine(args, config: str | None, kv_cache_dtype: str):
    if args.model:
        return ApiEngine(args, kv_cache_dtype)
    return RandomEngine(config, device=args.device, dtype=args.dtype, backend=args.backend,
                        max_len=args.input_len + args.output_len + 1,
                        max_seqs=1 if args.mode == "latency" else args.num_prompts,
                        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
                        kv_cache_dtype=kv_cache_dtype)


def run(args) -> int:
    _sizes(args)
    _peer_kinds(args)   # bad --peers: refused before anything loads
    config = None if args.tiny else args.config
    # The ceilings first: the engine's KV pool then takes the GPU's free memory.
    ceilings = roofline.absent(NO_FLOORS) if args.model else roofline.measure(
        *RandomEngine.placement(config, args.device, args.dtype))
    kv_dtypes = ("auto", "fp8") if args.kv_cache_dtype == "fp8" else ("auto",)
    results = Results(args.out or default_out(args.mode), f"{args.mode.capitalize()} benchmark",
                      provenance(args.argv))
    latency = args.mode == "latency"
    rows, series, traces, prompts = [], {}, [], None
    for kv in kv_dtypes:   # one engine at a time: the same prompts over each KV page dtype
        engine = _engine(args, config, kv)
        if prompts is None:
            n = args.warmup + args.iters if latency else args.num_prompts
            prompts = engine.prompts(random.Random(args.seed), n, args.input_len)
            results.record.update(model=engine.name, dtype=str(engine.dtype).removeprefix("torch."),
                                  input_len=str(args.input_len), output_len=str(args.output_len),
                                  tensor_parallel_size=str(args.tensor_parallel_size),
                                  kv_cache_dtype=" and ".join(kv_dtypes))
        got = (_latency if latency else _throughput)(args, engine, prompts, kv, series)
        rows.append(got)
        traces += got.pop("traces")
        if kv == "auto":   # the peers once, beside the model-dtype row (they free the engine)
            rows += _peer_rows(args, engine, prompts, series)
        engine.close()
    fig = (_rate_latency if latency else _rate_throughput)(args, engine, rows, series, results,
                                                           ceilings, len(prompts))
    results.add("Ceilings (measured in this run)", ceilings.rows, roofline.CEILING_COLUMNS)
    results.figures += [fig] if fig else []
    results.notes += [] if fig else [plots.NO_MATPLOTLIB]
    results.notes += [f"request failed: {t.error}" for t in traces if t.error][:5]
    for path in results.write():
        print(f"wrote {path}")
    print(f"\n{(results.out / 'report.md').read_text()}")
    return 1 if any(t.error for t in traces) else 0


NO_FLOORS = ("not measured: --model prompts have tokenizer- and image-dependent lengths; the "
             "floors need the fixed token counts of a random-weight run")


def _label(kv: str) -> str:
    return "fastllava" + (" (fp8 KV)" if kv == "fp8" else "")


def _latency(args, engine, prompts, kv: str, series: dict) -> dict:
    """fastllava's row over KV pages `kv` (its traces under "traces"); adds its TTFT series."""
    from fastllava.weights.progress import progress_bar

    label = _label(kv)
    for prompt in prompts[:args.warmup]:
        engine.run([prompt], args.output_len)
    bar, traces = progress_bar(args.iters, f"latency {label}", "request"), []
    for prompt in prompts[args.warmup:]:
        traces += engine.run([prompt], args.output_len)
        bar.update(1)
    bar.close()
    series[f"{label} TTFT"] = [1e3 * t.ttft for t in traces if not t.error]
    # kv_cache_dtype: not a column; roofline counts an fp8 row's KV at one byte per element
    return {"impl": label, "tp": args.tensor_parallel_size, "kv_cache_dtype": kv,
            **_latency_row(traces), "traces": traces}


def _throughput(args, engine, prompts, kv: str, series: dict) -> dict:
    from fastllava.weights.progress import progress_bar

    label = _label(kv)
    engine.run(prompts[:1], 2)   # warm-up: lazy compilation out of the timed batch
    bar = progress_bar(len(prompts), f"throughput {label}", "request")
    traces = engine.run(prompts, args.output_len, bar)
    bar.close()
    series[f"{label} TTFT"] = [1e3 * t.ttft for t in traces if not t.error]
    series[f"{label} e2e"] = [1e3 * (t.end - t.submit) for t in traces if not t.error]
    return {"impl": label, "tp": args.tensor_parallel_size, "max_batch": engine.max_batch,
            "kv_cache_dtype": kv, **_throughput_row(traces, args.input_len), "traces": traces}


def _peer_rows(args, engine, prompts, series: dict) -> list[dict]:
    """The transformers rows (--peers; none by default); adds their series."""
    rows = []
    for label, got in _peers(args, engine, prompts).items():
        ok = isinstance(got, list)
        if args.mode == "latency":
            rows.append({"impl": label, "tp": 1, **(_latency_row(got) if ok else {"note": got})})
            series[f"{label} TTFT"] = [1e3 * t.ttft for t in got] if ok else []
        else:
            rows.append({"impl": label, "tp": 1,
                         "max_batch": min(args.peer_batch_size, len(prompts)),
                         **(_throughput_row(got, args.input_len) if ok else {"note": got})})
            series[f"{label} e2e"] = ([1e3 * (t.end - t.submit) for t in got if not t.error]
                                      if ok else [])
    return rows


def _rate_latency(args, engine, rows, series, results, ceilings, _n):
    for r in rows:   # > 1: fastllava (model-dtype KV, rows[0]) is faster
        for key, faster in (("ttft_p50_ms", lambda a, b: b / a),
                            ("decode_tok_per_s_p50", lambda a, b: a / b)):
            ours, theirs = rows[0].get(key), r.get(key)
            r[f"fastllava_x_{key.split('_')[0]}"] = faster(ours, theirs) if ours and theirs else None
    if not args.model:
        roofline.rate_latency(rows, engine.config.text, engine.dtype.itemsize, args.input_len,
                              args.output_len, ceilings)
    results.add("Single request", rows, _LATENCY_COLUMNS)
    results.notes += roofline.LATENCY_LEGEND
    return plots.cdf(results.out / "latency_cdf.png", "Single-request TTFT", "ms", series)


def _rate_throughput(args, engine, rows, series, results, ceilings, num_prompts):
    ours = rows[0]["out_tok_per_s"]
    for r in rows:   # > 1: fastllava (model-dtype KV, rows[0]) is faster
        theirs = r.get("out_tok_per_s")
        r["fastllava_x_tput"] = ours / theirs if ours and theirs else None
    if not args.model:
        roofline.rate_throughput(rows, engine.config.text, engine.dtype.itemsize,
                                 num_prompts, args.input_len, args.output_len, ceilings)
    results.add("Offline batch", rows, _THROUGHPUT_COLUMNS)
    results.notes += roofline.THROUGHPUT_LEGEND
    return plots.cdf(results.out / "throughput_cdf.png", "Offline batch: per-request latency",
                     "ms", series)


_LATENCY_COLUMNS = ("impl", "iters", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
                    "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms", "decode_tok_per_s_p50", "out_tokens",
                    "decode_gb_s", "decode_ceiling_tok_s", "pct_copy", "ttft_floor_ms",
                    "pct_ttft_floor", "fastllava_x_ttft", "fastllava_x_decode", "tp", "note")
_THROUGHPUT_COLUMNS = ("impl", "max_batch", "requests", "ok", "errors", "wall_s", "req_per_s",
                       "out_tokens", "out_tok_per_s", "total_tok_per_s", "ttft_p50_ms",
                       "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "roofline_out_tok_s",
                       "pct_roofline", "fastllava_x_tput", "tp", "note")


def _peer_kinds(args) -> list[str]:
    peers = [k for k in getattr(args, "peers", "none").split(",") if k and k != "none"]
    if set(peers) - {"eager", "compiled"}:
        raise ValueError(f"--peers takes eager, compiled or none, got {args.peers!r}")
    if peers and args.model:
        raise ValueError("--peers compares random weights; it cannot be used with --model")
    return peers


def _peers(args, engine, prompts) -> dict:
    """label → the peer's traces, or → why it did not run (peers.py); frees the engine first."""
    from fastllava.benchmarks import peers
    from fastllava.weights.progress import progress_bar

    kinds = _peer_kinds(args)
    if not kinds:
        return {}
    if args.mode == "latency":
        return peers.peer_latency(engine, kinds, prompts, args.output_len, args.warmup)
    return peers.peer_throughput(engine, kinds, prompts, args.output_len, args.peer_batch_size,
                                 lambda label: progress_bar(len(prompts), label, "request"))


def _throughput_row(traces: list[stats.Trace], input_len: int) -> dict:
    row = stats.summarize(traces, {})
    row["total_tok_per_s"] = ((row["out_tokens"] or 0) + input_len * row["ok"]) / row["wall_s"]
    return row


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
