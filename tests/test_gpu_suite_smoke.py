"""bench/gpu_suite.py: the one command for a GPU slice.

--smoke runs every part at tiny shapes on the CPU end to end (the CI proof that the command a GPU
slice runs has working plumbing); the runner itself is checked in-process with fake parts: a
failing part does not stop the suite but fails its exit status, a part past its budget is killed,
a part that no longer fits the remaining budget is skipped and reported, $OUT gets a copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [suite] = [p for p in tmp_path.iterdir() if p.name.startswith("suite-")]
    summary = (suite / "SUMMARY.md").read_text()
    for part in ("gpu-tests", "kernels", "decode-13b", "decode-34b", "ttft", "preprocess",
                 "serving", "fp8-34b"):
        assert f"| {part} | ok |" in summary, summary[:3000]
        assert (suite / f"{part}.log").stat().st_size > 0
    for stem in ("kernels", "decode", "ttft", "preprocess", "serving"):
        assert list(suite.glob(f"{stem}-*.md")) and list(suite.glob(f"{stem}-*.csv")), stem
        assert f"## {'decode-13b' if stem == 'decode' else stem}: {stem}-" in summary
    assert (suite / "gpu-tests.xml").exists()
    assert (tmp_path / "out" / suite.name / "SUMMARY.md").read_text() == summary


@pytest.fixture
def suite(bench_script, monkeypatch):
    mod = bench_script("gpu_suite")

    def fake(*parts):
        monkeypatch.setattr(mod, "PARTS", tuple(mod.Part(n, b, cmd, cmd) for n, b, cmd in parts))
        monkeypatch.setattr(mod, "NAMES", tuple(n for n, _, _ in parts))
        monkeypatch.setattr(mod, "SMOKE_BUDGET_S", 3)
        monkeypatch.setattr(mod, "MIN_START_S", 2)
    return mod, fake


def test_a_failing_or_hanging_part_does_not_stop_the_suite(suite, tmp_path, monkeypatch):
    mod, fake = suite
    fake(("fails", 3, ["-c", "import sys; print('boom'); sys.exit(3)"]),
         ("hangs", 3, ["-c", "import time; time.sleep(60)"]),
         ("works", 3, ["-c", "open('{out}/works-x.md', 'w').write('| bar | 1 |')"]))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    t0 = time.monotonic()
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 1
    assert time.monotonic() - t0 < 30, "the hanging part was not killed at its budget"
    [suite_dir] = [p for p in tmp_path.iterdir() if p.name.startswith("suite-")]
    summary = (suite_dir / "SUMMARY.md").read_text()
    assert "| fails | FAILED (rc 3) |" in summary
    assert "| hangs | TIMEOUT after 3 s |" in summary
    assert "| works | ok |" in summary and "| bar | 1 |" in summary   # its table is embedded
    assert "boom" in (suite_dir / "fails.log").read_text()
    assert (tmp_path / "out" / suite_dir.name / "works-x.md").exists()


def test_a_part_that_no_longer_fits_is_skipped_and_reported(suite, tmp_path):
    mod, fake = suite
    fake(("slow", 3, ["-c", "import time; time.sleep(2.5)"]),
         ("late", 3, ["-c", "raise SystemExit(1)"]))
    assert mod.main(["--smoke", "--budget", "3", "--out", str(tmp_path)]) == 0   # skips pass
    [suite_dir] = [p for p in tmp_path.iterdir() if p.name.startswith("suite-")]
    summary = (suite_dir / "SUMMARY.md").read_text()
    assert "| slow | ok |" in summary
    assert "| late | skipped (" in summary and "part needs 3 s" in summary


def test_unknown_part_and_cpu_without_smoke_are_refused(suite, tmp_path, capsys):
    mod, _ = suite
    assert mod.main(["--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown parts ['nope']" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert mod.main(["--out", str(tmp_path)]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
