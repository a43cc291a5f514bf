"""The TTFT and latency / throughput benchmarks at --tensor-parallel-size 2 (tiny, CPU, gloo):
timed rows that say the TP size, and no worker process left behind. (bench/decode.py's:
tests/test_tensor_parallel.py.) The >= 1.8x TP=2 decode target needs 2 GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchkit import check_results, describe, table_rows
from test_bench_ttft import COLUMNS as TTFT_COLUMNS
from fastllava.cli import main

REPO = Path(__file__).resolve().parents[1]


def children() -> list[int]:
    """Live child processes of this one (the TP workers are)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.append(int(pid))
    return out


def test_latency_and_throughput_tp2_tiny(tmp_path):
    before = children()
    for mode, key in (("latency", "ttft_p50_ms"), ("throughput", "out_tok_per_s")):
        out = tmp_path / mode
        assert main(["bench", mode, "--tiny", "--tensor-parallel-size", "2",
                     "--out", str(out)]) == 0
        data = check_results(out, "--tensor-parallel-size 2")
        (row,) = [r for r in data["rows"] if r.get("tp") == 2]   # fastllava's, saying TP 2
        assert row["errors"] == 0 and row[key] > 0, row
        assert data["record"]["tensor_parallel_size"] == "2"
    assert children() == before, "a tensor-parallel worker outlived the benchmark"


def test_ttft_tp2_smoke():
    proc = subprocess.run([sys.executable, "bench/ttft.py", "--smoke", "--tensor-parallel-size",
                           "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    [header] = [line for line in proc.stdout.splitlines() if line.startswith("| model |")]
    names = [c.strip() for c in header.strip("|").split("|")]
    (row,) = table_rows(proc.stdout, TTFT_COLUMNS, 0, ("tiny",))
    got = dict(zip(names, row))
    assert got["tp"] == "2" and float(got["p50_ms"]) > 0, got
    assert "--tensor-parallel-size 2" in proc.stdout
