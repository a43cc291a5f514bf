"""bench/ttft.py --smoke --kv-cache-dtype fp8: one row per KV page dtype for the same random
model, both timed, in the printed table and the written .csv."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from benchkit import describe, table_rows

REPO = Path(__file__).resolve().parents[1]


def test_smoke_times_model_dtype_and_fp8_kv_rows(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ttft.py"), "--smoke",
                           "--kv-cache-dtype", "fp8", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, 13, 0, ("tiny",))
    assert [r[2] for r in rows] == ["auto", "fp8"], rows
    for r in rows:
        assert r[12] == "-" and float(r[6]) > 0 and float(r[6]) <= float(r[7]), r   # p50 <= p99
        assert int(r[4]) > 0, r   # image tokens
    [written] = tmp_path.glob("ttft-cpu-*.csv")
    with open(written, newline="") as f:
        assert [r["kv_cache"] for r in csv.DictReader(f)] == ["auto", "fp8"]
