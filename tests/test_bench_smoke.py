"""bench/kernels.py --smoke: the benchmark's plumbing runs end to end on the CPU (interpreted
kernels, tiny shapes) and reports a checked, timed row for every kernel in kernels/."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchkit import describe, table_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "kernels.py"
NOT_KERNELS = {"__init__", "ops", "common", "kv_quant"}   # helpers, no launcher of their own
# Every kernel file in kernels/ must have a benchmark row: a new kernel without one fails here.
STEMS = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if p.stem not in NOT_KERNELS)
COLUMNS = 10
# The row label of each file's own launcher: "triton", except ops whose launcher is a torch op.
LAUNCHER = {"fp8_linear": "scaled_mm", "sdpa_attention": "torch sdpa"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    return proc






def test_smoke_reports_a_checked_timed_row_for_every_kernel(tmp_path):
    assert len(STEMS) >= 7, f"expected the seven kernel files, found {STEMS}"
    proc = run_bench("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 0, STEMS)
    errors = [r for r in rows if r[9].startswith("ERROR")]
    assert not errors, f"{len(errors)} rows failed, first: {errors[0]}"
    for stem in STEMS:
        for impl in (LAUNCHER.get(stem, "triton"), "torch ref"):
            timed = [r for r in rows if r[0] == stem and r[2] == impl and r[3] != "-"]
            assert timed, f"no timed {impl!r} row for {stem}; rows: {[r for r in rows if r[0] == stem]}"
            assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in timed), timed
    for stem in ("paged_decode_attention", "prefill_attention"):
        peers = {r[2] for r in rows if r[0] == stem and r[2].startswith("sdpa")}
        assert peers == {"sdpa flash", "sdpa cudnn", "sdpa efficient"}, (stem, peers)

    md, csv_path = sorted(tmp_path.glob("kernels-cpu-*.md")), sorted(tmp_path.glob("kernels-cpu-*.csv"))
    assert len(md) == 1 and len(csv_path) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = md[0].read_text()
    assert table_rows(text, COLUMNS, 0, STEMS) == rows, "the written .md differs from the printed table"
    for key in ("gpu", "commit", "date", "torch", "triton", "cuda", "command"):
        assert f"- {key}: `" in text, f"run record lacks {key!r}"
    assert "bench/kernels.py --smoke --out" in text
    with open(csv_path[0], newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows), (len(records), len(rows))
    assert {r["kernel"] for r in records} == set(STEMS)
    assert all(r["commit"] and r["torch"] == torch.__version__ for r in records), records[0]


def test_only_runs_one_kernel_and_writes_nothing_without_out():
    results = REPO / "bench" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    proc = run_bench("--smoke", "--only", "gelu")
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 0, STEMS)
    assert rows and {r[0] for r in rows} == {"gelu"}, rows
    after = sorted(results.iterdir()) if results.exists() else []
    assert after == before, f"--smoke without --out wrote {set(after) - set(before)}"
    assert "wrote" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_real_shapes_without_cuda_exit_with_a_clear_message():
    proc = run_bench()
    assert proc.returncode != 0, describe(proc)
    assert "CUDA" in proc.stderr and "--smoke" in proc.stderr, describe(proc)


@pytest.fixture
def harness():
    from fastllava.benchmarks import kernel_harness
    return kernel_harness


def test_a_wrong_result_is_reported_and_not_timed(harness):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=gen)

    def silu_ref(x):
        return torch.sigmoid(x) * x

    case = harness.Case("silu", "N=37", x.numel() * 8.0, "GB/s", (x,),
                        {"triton": lambda x: silu_ref(x) * 1.001, "torch ref": silu_ref})
    wrong, ref = harness.run_case(case, None, on_gpu=False)
    assert wrong.note.startswith("ERROR: rel err") and wrong.ms is None and wrong.is_error, wrong
    assert ref.note == "" and ref.ms is not None and ref.value > 0, ref


def test_a_single_misplaced_element_fails_an_exact_case(harness):
    def write(dst, src, idx):      # the reference: dst[idx] = src
        dst[idx] = src

    def write_off_by_one(dst, src, idx):
        dst[idx] = src
        dst[idx[0]] += 1

    def make():
        gen = torch.Generator().manual_seed(1)
        return torch.zeros(50), torch.randn(9, generator=gen), torch.randperm(50, generator=gen)[:9]
    case = harness.Case("write", "N=9", 9 * 8.0, "GB/s", make(),
                        {"triton": write_off_by_one, "torch ref": write}, make=make,
                        outputs=lambda ret, args: (args[0],), exact=True)
    wrong, ref = harness.run_case(case, None, on_gpu=False)
    assert wrong.note == "ERROR: 1 elements differ from the reference", wrong
    assert ref.note == "" and ref.ms is not None, ref
