"""The CPU sampler over row blocks (`sampler.CPU_BLOCK_BYTES`) against the whole batch at once.

    python bench/cpu_sampler.py [--cases 64x64064,64x32064] [--blocks 1,2,4,8,16] [--repeats N]
                                [--out DIR] [--smoke]

`sample(logits, batch)` for B x V fp32 logits (random, fixed), every row sampled (temperature
0.7, its own seed), with top-p 0.9 (the sort) and top_p = 1 (no sort), one torch thread. Per case
the rows are `whole` (one block: what the sampler did before blocking) and blocks of at most
N MiB (N from --blocks; the default 8 is `CPU_BLOCK_BYTES`). Each repeat runs every row once,
interleaved, so they share the machine's load; the figure is the median over repeats, `vs whole`
= whole's median / the row's. Every blocked row's ids are checked equal to whole's first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common import fmt, run_header, write_outputs  # noqa: E402
from serving import device_name, short_commit  # noqa: E402

COLUMNS = ("B", "V", "top_p", "impl", "rows_per_block", "median_ms", "min_ms", "vs_whole")


def bench_case(B: int, V: int, top_p: float, blocks_mib: list[int], repeats: int) -> list[dict]:
    from fastllava.runtime import sampler
    from fastllava.runtime.sampler import SamplingBatch, sample

    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(B * V)) * 3
    batch = SamplingBatch.build([(0.7, top_p, 1000 + i, 5) for i in range(B)], "cpu")
    impls = {"whole": 1 << 62, **{f"blocks of {m} MiB": m << 20 for m in blocks_mib}}
    saved, times = sampler.CPU_BLOCK_BYTES, {k: [] for k in impls}
    try:
        sampler.CPU_BLOCK_BYTES = impls["whole"]
        want = sample(logits, batch)
        for name, size in impls.items():
            sampler.CPU_BLOCK_BYTES = size
            if not torch.equal(sample(logits, batch), want):
                raise AssertionError(f"B={B} V={V} top_p={top_p}: {name} ids differ from whole's")
        for _ in range(repeats):
            for name, size in impls.items():
                sampler.CPU_BLOCK_BYTES = size
                start = time.perf_counter()
                sample(logits, batch)
                times[name].append(time.perf_counter() - start)
    finally:
        sampler.CPU_BLOCK_BYTES = saved
    whole = statistics.median(times["whole"])
    return [{"B": B, "V": V, "top_p": top_p, "impl": name,
             "rows_per_block": min(B, max(1, size // (17 * V))),
             "median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
             "vs_whole": whole / statistics.median(t)} for (name, size), t in
            zip(impls.items(), times.values())]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="64x64064,64x32064,16x64064", help="comma-separated BxV")
    ap.add_argument("--blocks", default="2,4,8,16", help="block sizes in MiB")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None, help="write <out>/cpu_sampler-<machine>-<date>.md + .csv")
    ap.add_argument("--smoke", action="store_true", help="tiny cases, 1 repeat (CI)")
    args = ap.parse_args(argv[1:])
    if args.smoke:
        args.cases, args.blocks, args.repeats = "8x4099,3x997", "1,0", 1   # 0 MiB: 1 row a block
    torch.set_num_threads(1)
    cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    load_before = os.getloadavg()[0]
    rows = [r for B, V in cases for top_p in (0.9, 1.0)
            for r in bench_case(B, V, top_p, blocks, args.repeats)]
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    header = run_header(argv, "cpu")
    del header["gpu"], header["commit"]
    header = {"device": device_name(torch.device("cpu")), "commit": short_commit(), **header,
              "torch threads": "1", "cpu cores": str(os.cpu_count()),
              "load average (1 min)": load, "repeats": str(args.repeats)}
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    text = (f"# CPU sampler: row blocks vs the whole batch\n\n{meta}\n\n`sample()` on B x V fp32 "
            f"logits, every row sampled (temperature 0.7), one torch thread; median of "
            f"{args.repeats} interleaved repeats; `vs whole` = whole's median / the row's "
            f"(> 1: faster). Blocked ids checked equal to whole's.\n\n" + "\n".join(table) + "\n")
    print(text)
    if args.out:
        print("wrote", ", ".join(write_outputs(args.out, "cpu_sampler", header, text, COLUMNS,
                                               [[r[c] for c in COLUMNS] for r in rows])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
