"""bench/host_overhead.py --smoke: the host-overhead benchmark runs end to end on the CPU (tiny
vocab and contexts, B = 1 / 4, a few steps), times both loops for every case with the zero-cost
forward and with a simulated device, and writes the .md / .csv run record. No timing asserts,
except what the simulated device must show: steps are never shorter than the device time they
queued."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "host_overhead.py"
CASES = {(shape, B, mode) for shape in ("13b", "34b") for B in ("1", "4")
         for mode in ("greedy", "sampled")}


def test_smoke_times_both_loops_and_writes_the_run_record(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
        f"{proc.stderr[-3000:]}"
    md, csv_path = sorted(tmp_path.glob("host_overhead-*.md")), \
        sorted(tmp_path.glob("host_overhead-*.csv"))
    assert len(md) == 1 and len(csv_path) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = md[0].read_text()
    for field in ("gpu", "commit", "date", "torch", "command"):
        assert f"- {field}: `" in text, field
    with open(csv_path[0], newline="") as f:
        records = list(csv.DictReader(f))
    seen = {(r["shape"], r["B"], r["mode"], r["impl"], float(r["forward_us"]) > 0)
            for r in records}
    for shape, B, mode in CASES:
        for impl in ("serial", "overlap"):
            assert (shape, B, mode, impl, False) in seen, (shape, B, mode, impl)
            if mode == "greedy" or B == "1":
                assert (shape, B, mode, impl, True) in seen, (shape, B, mode, impl, "device")
    for r in records:
        assert float(r["host"]) > 0 and float(r["wall"]) > 0, r
        # the overlapped window starts with one step already queued: n steps wait (n - 1) x F
        n = int(r["steps"])
        assert float(r["wall"]) * n >= float(r["forward_us"]) * (n - 1), f"beat the device: {r}"
        assert r["command"].endswith("--smoke --out " + str(tmp_path)), r["command"]


def smoke_report(tmp_path, flag: str) -> str:
    """Runs the bench's --smoke with `flag` into tmp_path → the markdown report's text."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", flag, "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return next(tmp_path.glob("host_overhead-*.md")).read_text()


def test_stub_sampler_diagnostic_runs_and_is_recorded(tmp_path):
    """--stub-sampler (host phases without the CPU sampler's cache eviction) is a run of its own,
    said so in the run record, with every case and loop present."""
    text = smoke_report(tmp_path, "--stub-sampler")
    assert "- sampler: `stand-in" in text, text[:800]
    with open(next(tmp_path.glob("host_overhead-*.csv")), newline="") as f:
        seen = {(r["shape"], r["B"], r["mode"], r["impl"]) for r in csv.DictReader(f)}
    assert {(s, B, m, impl) for s, B, m in CASES for impl in ("serial", "overlap")} <= seen, seen


def test_graphs_times_the_graph_decode_path(tmp_path):
    """--graphs: every case and loop decodes through DecodeGraphs(capture=False), said so in the
    run record and in each row; the graph bodies (forward + argmax) count as forward, not pack."""
    text = smoke_report(tmp_path, "--graphs")
    assert "- decode: `DecodeGraphs(capture=False)" in text, text[:800]
    with open(next(tmp_path.glob("host_overhead-*.csv")), newline="") as f:
        records = list(csv.DictReader(f))
    assert records and all(r["decode"] == "graphs" for r in records), records[:2]
    seen = {(r["shape"], r["B"], r["mode"], r["impl"]) for r in records}
    assert {(s, B, m, impl) for s, B, m in CASES for impl in ("serial", "overlap")} <= seen, seen
    assert all(float(r["forward"]) > 0 for r in records), "the graph body was not timed"
