"""bench/cpu_path.py --smoke: the CPU-path benchmark runs end to end (tiny LLaVA-1.5 at real
geometry, 6 requests), reports the three engines (and, with --dtype-auto, the torch backend in
the CPU's native dtype) with finite figures, finds the torch backend's outputs identical to the
references', and writes the .md / .csv run record. No timing asserts."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

from fastllava.pretrained import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("fastllava backend=torch", "fastllava backend=reference",
           "transformers batched by 4 (sdpa)")
AUTO = "fastllava backend=torch dtype=auto ({})".format(
    "bfloat16" if cpu_has_native_bf16() else "float32")


def test_smoke_reports_every_engine_and_writes_the_run_record(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_path.py"), "--smoke",
                           "--dtype-auto", "--interleaved-ttft", "2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    tail = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, tail
    assert "all 6 outputs identical" in proc.stdout and "MISMATCH" not in proc.stdout, tail
    assert "dtype=auto vs float32 (torch backend)" in proc.stdout, tail
    assert "idle TTFT interleaved over 2 requests, both loaded: fastllava torch" in proc.stdout, tail
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] in (*ENGINES, AUTO):
            rows[cells[0]] = cells
    assert set(rows) == {*ENGINES, AUTO}, tail
    for engine, cells in rows.items():
        assert cells[1] == "6", (engine, cells)
        assert all(math.isfinite(float(c)) and float(c) > 0 for c in cells[2:-1]), (engine, cells)
        assert float(cells[-1]) >= 0, (engine, cells)   # the load average
    md, = tmp_path.glob("cpu_path-*.md")
    with open(md.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["engine"] for r in table] == [*ENGINES, AUTO]
    for key in ("device", "commit", "date", "torch", "command", "model", "dtype", "threads"):
        assert all(r[key] for r in table), key
