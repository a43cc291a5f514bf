"""The `fastllava bench` subcommand group, and `bench suite` (the others in sequence into one
folder, going on past failures; non-zero exit if any failed)."""

from __future__ import annotations

import traceback
from pathlib import Path

from fastllava.benchmarks import kernels, offline, serve
from fastllava.benchmarks.record import default_out

# Hook for the scripts of bench/ that other work adds (e.g. bench/gpu_suite.py, bench/ttft.py,
# bench/host_overhead.py): (step name, bench subcommand argv). Append a step here once it is a
# `fastllava bench` subcommand; the suite runs every step into <out>/<step name>.
EXTRA_STEPS: list[tuple[str, list[str]]] = []


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks: latency, throughput, serve (any server), kernels, suite",
        description="Benchmarks with a results folder per run (report.md, results.csv, "
                    "results.json, PNG figures). README 'Benchmarks'.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    offline.add_parsers(sub)
    serve.add_parser(sub)
    kernels.add_parser(sub)
    p = sub.add_parser("suite", help="latency, throughput, kernels (and serve with --base-url) "
                       "into one folder", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="every step in its smoke / --tiny mode")
    p.add_argument("--config", default="llava-1.5-13b", help="latency/throughput random-weight "
                   "shapes (default llava-1.5-13b)")
    p.add_argument("--model", help="latency/throughput on this checkpoint instead")
    p.add_argument("--peers", default="none", help="latency/throughput also time transformers: "
                   "eager, compiled or both, comma-separated (default none)")
    p.add_argument("--base-url", help="also run `bench serve` against this server")
    p.add_argument("--protocol", choices=("openai", "fal"), default="openai",
                   help="serve protocol (default openai)")
    p.add_argument("--kernel", help="the kernels step on this kernel only (its --only)")
    p.add_argument("--out", type=Path, help="results folder (default ./bench-results/suite-<UTC time>)")
    p.set_defaults(handler=run_suite, parser=bench)


def suite_steps(args) -> list[tuple[str, list[str]]]:
    model = ["--model", args.model] if args.model else ["--config", args.config]
    tiny = ["--tiny"] if args.smoke else []
    peers = ["--peers", args.peers] if args.peers != "none" else []
    steps = [("latency", ["latency", *model, *tiny, *peers]),
             ("throughput", ["throughput", *model, *tiny, *peers]),
             ("kernels", ["kernels", *(["--smoke"] if args.smoke else []),
                          *(["--only", args.kernel] if args.kernel else [])])]
    if args.base_url:
        steps.append(("serve", ["serve", "--base-url", args.base_url, "--protocol", args.protocol,
                                *(["--smoke"] if args.smoke else [])]))
    return steps + EXTRA_STEPS


def run_suite(args) -> int:
    out = args.out or default_out("suite")
    failed = []
    for name, argv in suite_steps(args):
        print(f"=== bench {' '.join(argv)}", flush=True)
        try:
            step = args.parser.parse_args([*argv, "--out", str(out / name)])
            step.argv = ["bench", *argv, "--out", str(out / name)]
            code = step.handler(step)
        except SystemExit as e:       # argparse rejected the step's flags
            code = e.code if isinstance(e.code, int) else 2
        except Exception:  # noqa: BLE001 - one failing step must not stop the suite
            traceback.print_exc()
            code = 1
        if code:
            failed.append(f"{name} (exit {code})")
    print(f"suite: {len(suite_steps(args)) - len(failed)} step(s) passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; results in {out}")
    return 1 if failed else 0
