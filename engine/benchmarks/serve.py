"""`fastllava bench serve`: drive any LLaVA server over HTTP with one seeded workload, at fixed
concurrencies (`--concurrency 1,4,16`) or Poisson request rates (`--request-rate 1,2,4`), and
report TTFT / ITL / TPOT / e2e percentiles, request and token throughput, errors and goodput
under `--slo`. One row per sweep point; figures: TTFT and ITL CDFs, and throughput / latency
against the swept value."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from fastllava.benchmarks import clients, plots, stats, workload
from fastllava.benchmarks.record import Results, default_out, provenance

COLUMNS = ("point", "requests", "ok", "errors", "wall_s", "req_per_s", "out_tokens", "out_tok_per_s",
           *(f"{m}_p{q}_ms" for m in ("ttft", "itl", "tpot", "e2e") for q in stats.QUANTILES),
           "slo_met", "goodput_req_per_s")


def _numbers(kind, flag: str):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: expected positive numbers like 1,4,16, "
                                             f"got {text!r}")
        return values
    return parse


def _slo(text: str) -> dict[str, float]:
    try:
        return stats.parse_slo(text)
    except ValueError as e:   # argparse shows only ArgumentTypeError messages
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="benchmark any running server (fastllava, vLLM, SGLang, fal)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000; fal: "
      "https://fal.run (stream/sync) or https://queue.fal.run (queue); fastllava's queue: URL/queue")
    a("--protocol", choices=("openai", "fal"), default="openai",
      help="openai: /v1/chat/completions with stream=true; fal: the fal model API (default openai)")
    a("--fal-mode", choices=clients.FAL_MODES, default="stream",
      help="fal: /stream SSE snapshots, the sync call, or the queue (submit, poll, result) "
      "(default stream)")
    a("--endpoint", default="fal-ai/llava-next", help="fal endpoint id (default fal-ai/llava-next)")
    a("--served-model", help="OpenAI \"model\" field (default: the first id of GET /v1/models)")
    a("--api-key", help="key sent as 'Key K' (fal) or 'Bearer K' (openai); default env FAL_KEY "
      "or OPENAI_API_KEY")
    a("--num-requests", type=int, help="requests per sweep point (default 64; --smoke 6)")
    a("--concurrency", type=_numbers(int, "--concurrency"),
      help="comma-separated fixed concurrencies to sweep (default 4 unless --request-rate)")
    a("--request-rate", type=_numbers(float, "--request-rate"),
      help="comma-separated Poisson arrival rates (requests/s) to sweep instead")
    a("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    a("--image-sizes", default="336x336,672x672,1024x768,1280x720",
      help="generated images, WxH list (default 336x336,672x672,1024x768,1280x720; --smoke 64x48)")
    a("--image-format", choices=("jpeg", "png"), default="jpeg", help="generated image encoding")
    a("--images", type=Path, help="use the images of this folder instead of generated ones")
    a("--prompts", type=Path, help="JSONL file of {\"prompt\", optional \"max_tokens\", \"image\"} "
      "(default: a built-in set of 8 questions)")
    a("--max-tokens", default=None, help="fixed:N, uniform:LO-HI or normal:MEAN,STD "
      "(default uniform:32-128; --smoke fixed:6)")
    a("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    a("--slo", type=_slo, default={}, help="goodput SLO in seconds, e.g. "
      "ttft=0.5,itl=0.05[,e2e=10] (itl: the request's mean inter-token gap)")
    a("--timeout", type=float, default=600.0, help="HTTP timeout in s for each connect / read "
      "of a request, i.e. the longest silence between stream events (default 600)")
    a("--poll-interval", type=float, default=0.1, help="fal queue status poll period in s")
    a("--warmup", type=int, default=1, help="untimed requests sent first (default 1)")
    a("--out", type=Path, help="results folder (default ./bench-results/serve-<UTC time>)")
    a("--smoke", action="store_true", help="6 small requests per point: checks the plumbing")
    p.set_defaults(handler=run)


def _point_label(kind: str, value: float) -> str:
    return f"concurrency {value:g}" if kind == "concurrency" else f"rate {value:g}/s"


async def _one(send, req, bar) -> stats.Trace:
    import httpx

    t0 = time.perf_counter()
    try:
        trace = await send(req)
    except (httpx.HTTPError, ValueError, KeyError) as exc:   # JSON errors are ValueErrors
        trace = stats.Trace(t0, error=f"{type(exc).__name__}: {exc}"[:200])
    bar.update(1)
    return trace


async def _run_point(send, reqs, kind: str, value: float, seed: int, label: str):
    from fastllava.weights.progress import progress_bar

    bar = progress_bar(len(reqs), label, "request")
    try:
        if kind == "concurrency":
            gate = asyncio.Semaphore(int(value))

            async def gated(req):
                async with gate:
                    return await _one(send, req, bar)
            return await asyncio.gather(*(gated(r) for r in reqs))
        offsets = workload.poisson_offsets(len(reqs), value, seed)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def timed(req, at):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            return await _one(send, req, bar)
        return await asyncio.gather(*(timed(r, t) for r, t in zip(reqs, offsets)))
    finally:
        bar.close()


async def _drive(args, reqs, points) -> tuple[str, dict[str, list[stats.Trace]]]:
    import httpx

    key = args.api_key or os.environ.get("FAL_KEY" if args.protocol == "fal" else "OPENAI_API_KEY")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits,
                                 headers=clients.auth_headers(args.protocol, key)) as client:
        if args.protocol == "openai":
            model = args.served_model or await clients.served_model(client, args.base_url)
            target = f"openai model {model!r} at {args.base_url}"

            def send(req):
                return clients.openai_request(client, args.base_url, model, req, args.temperature)
        else:
            target = f"fal {args.endpoint} ({args.fal_mode}) at {args.base_url}"

            def send(req):
                return clients.fal_request(client, args.base_url, args.endpoint, args.fal_mode,
                                           req, args.temperature, args.poll_interval)
        for req in reqs[:args.warmup]:
            await _one(send, req, _Silent())
        traces = {}
        for kind, value in points:
            label = _point_label(kind, value)
            traces[label] = await _run_point(send, reqs, kind, value, args.seed, label)
    return target, traces


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


def run(args) -> int:
    if args.concurrency and args.request_rate:
        raise ValueError("give --concurrency or --request-rate, not both")
    n = args.num_requests or (6 if args.smoke else 64)
    if n < 1:
        raise ValueError(f"--num-requests must be >= 1, got {n}")
    sizes = workload.parse_sizes("64x48" if args.smoke else args.image_sizes)
    reqs = workload.build(n, args.seed, sizes=sizes, image_format=args.image_format,
                          images_dir=args.images, prompts_file=args.prompts,
                          max_tokens=args.max_tokens or ("fixed:6" if args.smoke
                                                         else "uniform:32-128"))
    points = ([("rate", r) for r in args.request_rate] if args.request_rate else
              [("concurrency", c) for c in (args.concurrency or [4])])
    results = Results(args.out or default_out("serve"), "Serving benchmark", provenance(args.argv))
    target, traces = asyncio.run(_drive(args, reqs, points))
    rows = [{"point": label, **stats.summarize(ts, args.slo)} for label, ts in traces.items()]
    for (kind, value), row in zip(points, rows):
        row[kind] = value
    results.record.update(target=target, workload=_describe(reqs, args))
    results.add("Sweep", rows, COLUMNS)
    results.notes += _notes(args, traces)
    _figures(results, points, rows, traces)
    for path in results.write():
        print(f"wrote {path}")
    print(f"\n{(results.out / 'report.md').read_text()}")
    return 1 if any(r["errors"] for r in rows) else 0


def _describe(reqs, args) -> str:
    mt = [r.max_tokens for r in reqs]
    src = f"images from {args.images}" if args.images else "generated images"
    return (f"{len(reqs)} requests per point (seed {args.seed}), {src}, max_tokens "
            f"{min(mt)}..{max(mt)}, temperature {args.temperature:g}")


def _notes(args, traces) -> list[str]:
    notes = []
    if args.slo:
        notes.append("SLO (s): " + ", ".join(f"{k} <= {v:g}" for k, v in args.slo.items()))
    if args.protocol == "fal" and args.fal_mode != "stream":
        notes.append(f"fal {args.fal_mode}: no stream, so TTFT = e2e and tokens are unknown")
    elif args.protocol == "fal":
        notes.append("fal stream: ITL from snapshot arrivals; tokens = snapshots whose text grew")
    for label, ts in traces.items():
        errs = [t.error for t in ts if t.error]
        if errs:
            notes.append(f"{label}: {len(errs)} failed request(s), first: {errs[0]}")
    return notes


def _figures(results: Results, points, rows, traces) -> None:
    out = results.out
    ok = {label: [t for t in ts if not t.error] for label, ts in traces.items()}
    itl = {k: [1e3 * x for t in v for x in t.itls] for k, v in ok.items()}
    figs = [plots.cdf(out / "ttft_cdf.png", "TTFT", "ms",
                      {k: [1e3 * t.ttft for t in v] for k, v in ok.items()})]
    if any(itl.values()):   # none without a stream (fal sync / queue)
        figs.append(plots.cdf(out / "itl_cdf.png", "Inter-token latency", "ms", itl))
    if len(points) > 1:
        kind = points[0][0]
        x = [v for _, v in points]
        xlabel = "concurrency" if kind == "concurrency" else "request rate (req/s)"
        figs.append(plots.lines(out / "sweep.png", "Throughput and latency", xlabel, x, {
            "requests/s": {"req/s": [r["req_per_s"] for r in rows],
                           "goodput": [r["goodput_req_per_s"] for r in rows]},
            "output tokens/s": {"tok/s": [r["out_tok_per_s"] for r in rows]},
            "latency (ms)": {"TTFT p50": [r["ttft_p50_ms"] for r in rows],
                             "TTFT p99": [r["ttft_p99_ms"] for r in rows],
                             "e2e p50": [r["e2e_p50_ms"] for r in rows]}}))
    if any(f is None for f in figs):
        results.notes.append(plots.NO_MATPLOTLIB)
    results.figures += [f for f in figs if f is not None]
