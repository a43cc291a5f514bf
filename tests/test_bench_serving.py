"""bench/serving.py --smoke: the serving benchmark runs end to end on the CPU (tiny random
LLaVA-NeXT, 8 requests), reports both submission modes with finite, ordered percentiles, finds the
outputs identical across modes, and writes the .md / .csv run record. No timing asserts."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchkit import describe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "serving.py"
HEADS = 16          # columns of the mode table
MODES = ("sequential", "concurrent")
METADATA = ("device", "commit", "date", "torch", "triton", "cuda", "command", "model", "dtype",
            "backend")




def mode_rows(text: str) -> dict[str, list[str]]:
    """Mode-table rows of the markdown report, by mode: the cells of `| mode | requests | ...`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == HEADS and cells[0] != "mode":
            rows[cells[0]] = cells
    return rows


def test_smoke_reports_both_modes_and_writes_the_run_record(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "MISMATCH" not in proc.stdout + proc.stderr, describe(proc)
    assert "batch invariance: all 8 outputs identical" in proc.stdout, describe(proc)
    rows = mode_rows(proc.stdout)
    assert set(rows) == set(MODES), f"modes reported: {sorted(rows)}\n{describe(proc)}"

    head = next(line for line in proc.stdout.splitlines() if line.startswith("| mode |"))
    heads = [c.strip() for c in head.strip().strip("|").split(" | ")]
    for mode, cells in rows.items():
        value = dict(zip(heads, cells, strict=True))
        assert value["requests"] == "8", (mode, value)
        for metric, qs in (("TTFT", (50, 90, 99)), ("ITL", (50, 90, 99)), ("e2e", (50, 99))):
            ps = [float(value[f"{metric} p{q} ms"]) for q in qs]
            assert all(math.isfinite(p) and p > 0 for p in ps), (mode, metric, ps)
            assert ps == sorted(ps), f"{mode} {metric} percentiles out of order: {ps}"
        for key in ("req/s", "out tok/s", "req/s vs sequential"):
            assert math.isfinite(float(value[key])) and float(value[key]) > 0, (mode, key, value)
    assert float(rows["sequential"][heads.index("req/s vs sequential")]) == 1.0

    md, csv_path = sorted(tmp_path.glob("serving-*.md")), sorted(tmp_path.glob("serving-*.csv"))
    assert len(md) == 1 and len(csv_path) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = md[0].read_text()
    assert mode_rows(text) == rows, "the written .md differs from the printed table"
    for key in METADATA:
        assert f"- {key}: `" in text, f"run record lacks {key!r}:\n{text[:1500]}"
    with open(csv_path[0], newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["mode"] for r in records] == list(MODES), records
    for r in records:
        missing = [k for k in METADATA if not r.get(k)]
        assert not missing, f"CSV row {r['mode']} lacks {missing}: {r}"
        assert r["torch"] == torch.__version__, r
        assert "bench/serving.py --smoke --device cpu --out" in r["command"], r["command"]
        assert r["device"].startswith("cpu"), r["device"]
        assert r["commit"] != "unknown" and " " not in r["commit"], r["commit"]


@pytest.fixture
def serving(bench_script):
    return bench_script("serving")


def test_latencies_come_from_the_event_timestamps(serving):
    # Request A: tokens 1, 2 then 4 (two in one event: the 0.3 s gap counts 0.15 s per token),
    # then a final event without a new token. Request B: its first event already holds 3 tokens
    # (no ITL sample) and carries runtime metrics.
    a = serving.Trace(10.0, [(10.2, 1), (10.3, 2), (10.6, 4), (10.7, 4)],
                      {"output": "x", "completion_tokens": 4})
    b = serving.Trace(10.1, [(10.4, 3)], {"output": "y", "completion_tokens": 3,
                                          "metrics": {"queue_s": 0.05, "cached_prompt_tokens": 32}})
    failed = serving.Trace(10.0, error="RuntimeError: boom")
    row = serving.summarize("m", [a, failed])
    assert row["requests"] == 1 and row["wall_s"] == pytest.approx(0.7), row
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["e2e_p99_ms"] == pytest.approx(700)
    assert [row[f"itl_p{q}_ms"] for q in (50, 90, 99)] == pytest.approx([150, 150, 150]), row
    assert row["queue_mean_ms"] is None and row["cached_prompt_tokens"] is None, row
    row = serving.summarize("m", [a, b])
    assert row["ttft_p50_ms"] == pytest.approx(250) and row["ttft_p99_ms"] == pytest.approx(299)
    assert row["itl_p50_ms"] == pytest.approx(150) and row["itl_p90_ms"] == pytest.approx(150)
    assert row["out_tok_per_s"] == pytest.approx(7 / 0.7), row
    assert row["queue_mean_ms"] == pytest.approx(50) and row["cached_prompt_tokens"] == 32, row


def test_a_differing_output_is_reported_as_a_mismatch(serving):
    workload = [{"temperature": 0.0}, {"temperature": 0.7, "seed": 5}, {"temperature": 0.0}]

    def traces(*outputs):
        return [serving.Trace(0.0, [(1.0, 2)], {"output": o, "completion_tokens": 2})
                for o in outputs]
    assert serving.mismatches(workload, traces("a", "b", "c"), traces("a", "b", "c"), "x") == []
    lines = serving.mismatches(workload, traces("a", "b", "c"), traces("a", "B", "c"), "concurrent")
    assert len(lines) == 1 and lines[0].startswith("MISMATCH concurrent"), lines
    assert "request 1 (sampled seed 5)" in lines[0] and "'b'" in lines[0] and "'B'" in lines[0]
