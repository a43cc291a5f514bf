"""`fastllava bench kernels`: the kernel benchmark (fastllava.benchmarks.kernel_table: every
Triton kernel at the real shapes beside its torch reference and SDPA, checked, then timed, in
GB/s or TFLOP/s and % of the ceilings measured in the same run) into a results folder, with a
figure of each row against its roofline. Without CUDA only `--smoke` runs (tiny shapes,
interpreted kernels: plumbing only); the real-shape run says it needs a GPU."""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from fastllava.benchmarks import plots
from fastllava.benchmarks.record import Results, default_out, provenance

COLUMNS = ("kernel", "case", "impl", "ms", "value", "unit", "pct_ceiling", "bar", "vs_triton",
           "note")


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="Triton kernels vs torch / SDPA at the real shapes",
                       description=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU, kernels interpreted (times mean nothing)")
    p.add_argument("--only", help="one kernel (e.g. paged_decode_attention)")
    p.add_argument("--out", type=Path, help="results folder (default ./bench-results/kernels-<UTC time>)")
    p.set_defaults(handler=run)


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="fastllava-kernels-") as tmp:
        # A fresh interpreter: --smoke must set TRITON_INTERPRET before the first kernel import,
        # and this process may have imported the kernels already (bench suite).
        cmd = [sys.executable, "-m", "fastllava.benchmarks.kernel_table", "--out", tmp,
               *(["--smoke"] if args.smoke else []), *(["--only", args.only] if args.only else [])]
        proc = subprocess.run(cmd)   # its report (and any refusal) prints as it goes
        found = sorted(Path(tmp).glob("kernels-*.csv"))
        if not found:   # refused (no GPU) or crashed: its stderr already said why
            return proc.returncode or 1
        with open(found[0], newline="") as f:
            raw = list(csv.DictReader(f))
    rows = [{c: _number(r.get(c)) for c in COLUMNS} for r in raw]
    results = Results(args.out or default_out("kernels"), "Kernel benchmark", provenance(args.argv))
    results.record["kernel script"] = " ".join(["python", *cmd[1:3], *cmd[5:]])
    results.add("Ceilings", [r for r in rows if r["kernel"] == "ceiling"], COLUMNS)
    results.add("Kernels", [r for r in rows if r["kernel"] != "ceiling"], COLUMNS)
    timed = [r for r in rows if r["kernel"] != "ceiling" and isinstance(r["value"], float)]
    has_ceiling = any(isinstance(r["pct_ceiling"], float) for r in timed)
    fig = plots.bars(results.out / "kernels_roofline.png",
                     "Kernels: % of the measured ceiling" if has_ceiling else
                     "Kernels (no ceiling: --smoke / CPU; interpreter rates)",
                     [f"{r['kernel']} {r['case']} [{r['impl']}]" for r in timed],
                     [100 * r["pct_ceiling"] if has_ceiling and isinstance(r["pct_ceiling"], float)
                      else (r["value"] if not has_ceiling else 0.0) for r in timed],
                     "% of ceiling" if has_ceiling else "GB/s or TFLOP/s",
                     100.0 if has_ceiling else None)
    results.figures += [fig] if fig else []
    results.notes += [] if fig else [plots.NO_MATPLOTLIB]
    for path in results.write():
        print(f"wrote {path}")
    return proc.returncode


def _number(text):
    if text in (None, ""):
        return None
    try:
        return float(text)
    except ValueError:
        return text
