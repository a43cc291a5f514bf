"""bench/decode.py --smoke: the decode benchmark's plumbing runs end to end on the CPU (tiny config,
torch ops): a timed fastllava-engine row and a timed transformers-eager row for every batch size,
the GPU-only rows marked n/a with a reason, and the run record in the written .md / .csv."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchkit import describe, table_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "decode.py"
COLUMNS = 12
FASTLLAVA = ("fastllava engine", "fastllava overlapped loop", "fastllava graph replay")
PEERS = ("hf eager (DynamicCache)", "hf compiled (StaticCache, reduce-overhead)")
IMPLS = FASTLLAVA + PEERS
TIMED_ON_CPU = ("fastllava engine", "fastllava overlapped loop", "hf eager (DynamicCache)")
SMOKE_BATCHES = ("1", "3")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)






def test_smoke_reports_engine_and_peer_rows_for_every_batch(tmp_path):
    proc = run_bench("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 3, IMPLS)
    assert {(r[1], r[3]) for r in rows} == {(b, i) for b in SMOKE_BATCHES for i in IMPLS}, rows
    assert len(rows) == len(SMOKE_BATCHES) * len(IMPLS), rows
    for r in rows:
        model, B, context, impl, ctx, ms, tok_s, gb_s, pct, vs, bar, note = r
        assert not note.startswith("ERROR"), r
        if impl in TIMED_ON_CPU:
            assert note == "-" and float(ms) > 0 and float(gb_s) > 0, r
            # tok/s = B * 1000 / ms; mean context past the prompt (prefill token + warm-up)
            assert abs(float(tok_s) - int(B) * 1e3 / float(ms)) <= 1e-3 * float(tok_s) + 0.01, r
            assert float(ctx) > float(context), r
            assert pct == "-", f"no copy ceiling on the CPU, yet % copy = {pct}: {r}"
        else:   # CUDA graphs and torch.compile's reduce-overhead need a GPU
            assert ms == "-" and note.startswith("n/a: "), r
        if impl == "fastllava engine":
            assert float(vs) == 1.0, r
    md = sorted(tmp_path.glob("decode-cpu-*.md"))
    csv_path = sorted(tmp_path.glob("decode-cpu-*.csv"))
    assert len(md) == 1 and len(csv_path) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = md[0].read_text()
    assert table_rows(text, COLUMNS, 3, IMPLS) == rows, "the written .md differs from the printed table"
    for key in ("gpu", "commit", "date", "torch", "triton", "cuda", "command", "model", "dtype"):
        assert f"- {key}: `" in text, f"run record lacks {key!r}"
    assert "bench/decode.py --smoke --out" in text
    with open(csv_path[0], newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows), (len(records), len(rows))
    assert [(r["B"], r["impl"]) for r in records] == [(r[1], r[3]) for r in rows]
    assert all(r["commit"] and r["torch"] == torch.__version__ for r in records), records[0]


def test_gap_lines_subtract_the_replay_from_each_engine_loop(bench_script):
    """The GPU-idle gap per step: each loop's ms/step minus the same batch and variant's bare
    graph replay; a batch or variant without a timed replay (the CPU, an n/a row) gets none."""
    Row, gap_lines = bench_script("decode_plan").Row, bench_script("decode_report").gap_lines
    rows = [Row("fastllava engine", 1, ms=5.5), Row("fastllava overlapped loop", 1, ms=5.02),
            Row("fastllava graph replay", 1, ms=5.0),
            Row("fastllava engine (fp8)", 1, ms=3.4), Row("fastllava graph replay (fp8)", 1,
                                                          ms=3.0),
            Row("fastllava engine", 8, ms=9.0), Row("fastllava graph replay", 8, note="n/a")]
    assert gap_lines(rows) == [
        "- GPU-idle gap per step at B=1 (engine ms/step - graph replay's 5.000 ms): "
        "serial +0.500 ms, overlapped +0.020 ms",
        "- GPU-idle gap per step (fp8) at B=1 (engine ms/step - graph replay's 3.000 ms): "
        "serial +0.400 ms"]


def test_smoke_overlapped_row_advances_every_sequence(tmp_path):
    """The overlapped-loop row is timed on the CPU too and reports no gap line (no replay)."""
    proc = run_bench("--smoke", "--peers", "none")
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 3, FASTLLAVA)
    timed = [r for r in rows if r[3] == "fastllava overlapped loop"]
    assert len(timed) == len(SMOKE_BATCHES) and all(float(r[5]) > 0 and r[11] == "-"
                                                    for r in timed), rows
    assert "GPU-idle gap" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_real_shapes_refuse_to_start_without_cuda():
    proc = run_bench("--model", "llava-1.5-13b")
    assert proc.returncode == 2, describe(proc)
    assert "needs a CUDA GPU" in proc.stderr and "--smoke" in proc.stderr, proc.stderr


def test_bad_peer_name_is_refused():
    proc = run_bench("--smoke", "--peers", "vllm")
    assert proc.returncode == 2 and "vllm" in proc.stderr, describe(proc)


def ratio_line(stdout: str, name: str) -> float:
    """The X of the report's "- <name> / model dtype decode tok/s at B=1: X.XXx" line."""
    [line] = [ln for ln in stdout.splitlines()
              if ln.startswith(f"- {name} / model dtype decode tok/s at B=1: ")]
    return float(line.split(": ")[1].split("x")[0])


def test_smoke_with_fp8_times_model_dtype_then_fp8_weights_in_one_run(tmp_path, bench_script):
    """--quantization fp8: fastllava's model-dtype rows AND its FP8-linear rows ("(fp8)"), in one
    run; the fp8 rows count decoder weights at one byte, the model-dtype rows and the
    transformers peer (fp32 here) the full bytes; the report gives fp8 / model dtype tok/s at
    B=1 (the issue's >= 1.7x number), computed from the two engine rows."""
    from fastllava.weights.random import TINY_CONFIG, llava_config

    fp8_impls = tuple(i + " (fp8)" for i in FASTLLAVA)
    proc = run_bench("--smoke", "--quantization", "fp8", "--peers", "eager", "--out",
                     str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    assert "- quantization: `none and fp8 (fastllava rows)`" in proc.stdout
    table = table_rows(proc.stdout, COLUMNS, 3, IMPLS + fp8_impls)
    assert {(r[1], r[3]) for r in table} == {(b, i) for b in SMOKE_BATCHES
                                            for i in IMPLS + fp8_impls}, table
    rows = {(r[1], r[3]): r for r in table}
    step_bytes, t = bench_script("decode_report").step_bytes, llava_config(TINY_CONFIG).text
    for B in SMOKE_BATCHES:
        for impl, linear_e in (("fastllava engine", None), ("fastllava engine (fp8)", 1),
                               ("hf eager (DynamicCache)", None)):
            r = rows[(B, impl)]
            assert r[11] == "-" and float(r[5]) > 0, r
            expected = step_bytes(t, int(B), float(r[4]), 4, linear_e) / float(r[5]) / 1e6
            assert abs(float(r[7]) - expected) <= 0.01 * expected, (r, expected)
        assert step_bytes(t, int(B), 30.0, 4, 1) < 0.8 * step_bytes(t, int(B), 30.0, 4)
    tok_s = {impl: float(rows[("1", impl)][6]) for impl in ("fastllava engine (fp8)", IMPLS[0])}
    ratio = tok_s["fastllava engine (fp8)"] / tok_s[IMPLS[0]]
    assert abs(ratio_line(proc.stdout, "fp8") - ratio) <= 0.01 + 0.01 * ratio, proc.stdout
    [md] = tmp_path.glob("decode-cpu-*.md")
    assert ratio_line(md.read_text(), "fp8") == ratio_line(proc.stdout, "fp8")


def test_smoke_with_fp8_weights_and_kv_times_every_combination(tmp_path):
    """--quantization fp8 --kv-cache-dtype fp8: model dtype, "(fp8 KV)", "(fp8)" and
    "(fp8, fp8 KV)" fastllava rows in that order per batch, and a ratio line per fp8 variant."""
    suffixes = ("", " (fp8 KV)", " (fp8)", " (fp8, fp8 KV)")
    impls = tuple(i + s for s in suffixes for i in FASTLLAVA)
    proc = run_bench("--smoke", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
                     "--peers", "none")
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 3, impls + PEERS)
    for B in SMOKE_BATCHES:
        assert [r[3] for r in rows if r[1] == B] == list(impls + PEERS), rows
        assert all(float(r[5]) > 0 for r in rows
                   if r[1] == B and r[3].startswith(FASTLLAVA[:2])), rows
    for name in ("fp8 KV", "fp8", "fp8, fp8 KV"):
        assert ratio_line(proc.stdout, name) > 0, proc.stdout


def test_smoke_with_fp8_kv_times_both_caches_in_one_run(tmp_path, bench_script):
    """--kv-cache-dtype fp8: the fastllava rows over model-dtype pages and over fp8 pages, for
    every batch, in one run; the fp8 rows count their KV at one byte per element."""
    from fastllava.weights.random import TINY_CONFIG, llava_config

    fp8_impls = tuple(i + " (fp8 KV)" for i in FASTLLAVA)
    proc = run_bench("--smoke", "--kv-cache-dtype", "fp8", "--peers", "none", "--out",
                     str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    assert "- kv_cache_dtype: `auto and fp8 (fastllava rows)`" in proc.stdout
    rows = {(r[1], r[3]): r for r in table_rows(proc.stdout, COLUMNS, 3, IMPLS + fp8_impls)}
    step_bytes, t = bench_script("decode_report").step_bytes, llava_config(TINY_CONFIG).text
    for B in SMOKE_BATCHES:
        for impl, kv_e in (("fastllava engine", None), ("fastllava engine (fp8 KV)", 1)):
            r = rows[(B, impl)]
            assert r[11] == "-" and float(r[5]) > 0, r
            expected = step_bytes(t, int(B), float(r[4]), 4, None, kv_e) / float(r[5]) / 1e6
            assert abs(float(r[7]) - expected) <= 0.01 * expected, (r, expected)
        assert rows[(B, "fastllava graph replay (fp8 KV)")][11].startswith("n/a: "), rows
        assert step_bytes(t, int(B), 300.0, 4, None, 1) < step_bytes(t, int(B), 300.0, 4)
