"""bench/ttft.py --smoke with --kv-cache-dtype fp8 and/or --quantization fp8: the model-dtype
row first, then one row per other (weights, KV pages) combination, for the same random model,
all timed in one run, in the printed table, the written .csv, and the p50 ratio lines."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchkit import describe, table_rows

REPO = Path(__file__).resolve().parents[1]
COLUMNS = 14


def run_smoke(tmp_path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ttft.py"), "--smoke", *args,
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, describe(proc)
    return proc


@pytest.mark.parametrize("flags, variants", [
    (("--kv-cache-dtype", "fp8"), [("none", "auto"), ("none", "fp8")]),
    (("--quantization", "fp8"), [("none", "auto"), ("fp8", "auto")]),
    (("--quantization", "fp8", "--kv-cache-dtype", "fp8"),
     [("none", "auto"), ("none", "fp8"), ("fp8", "auto"), ("fp8", "fp8")]),
])
def test_smoke_times_model_dtype_then_each_fp8_variant(tmp_path, flags, variants):
    proc = run_smoke(tmp_path, *flags)
    rows = table_rows(proc.stdout, COLUMNS, 0, ("tiny",))
    assert [(r[2], r[3]) for r in rows] == variants, rows
    for r in rows:
        assert r[13] == "-" and float(r[7]) > 0 and float(r[7]) <= float(r[8]), r   # p50 <= p99
        assert int(r[5]) > 0, r   # image tokens
    [written] = tmp_path.glob("ttft-cpu-*.csv")
    with open(written, newline="") as f:
        assert [(r["quantization"], r["kv_cache"]) for r in csv.DictReader(f)] == variants
    base = float(rows[0][7])
    for r in rows[1:]:   # "- tiny, <variant> / model dtype TTFT p50: X.XXx"
        name = ", ".join(["fp8"] * (r[2] == "fp8") + ["fp8 KV"] * (r[3] == "fp8"))
        [line] = [ln for ln in proc.stdout.splitlines()
                  if ln.startswith(f"- tiny, {name} / model dtype TTFT p50: ")]
        ratio = float(line.split(": ")[1].rstrip("x"))
        assert abs(ratio - float(r[7]) / base) <= 0.01 + 0.01 * ratio, (line, rows)
