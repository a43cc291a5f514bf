"""bench/cpu_sampler.py --smoke: the CPU sampler's row blocks beside the whole batch, end to end
(two tiny cases, 1 repeat): every row timed, blocked ids checked equal to whole's, the ratio
column consistent, the .md / .csv run record written. No timing asserts."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from benchkit import describe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cpu_sampler.py"


def test_smoke_times_every_block_size_and_writes_the_run_record(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    (md,), (table,) = tmp_path.glob("cpu_sampler-*.md"), tmp_path.glob("cpu_sampler-*.csv")
    assert "# CPU sampler" in md.read_text() and "commit" in md.read_text()
    rows = [r for r in csv.DictReader(table.open())]
    cases = {(r["B"], r["V"], r["top_p"]) for r in rows}
    assert cases == {(b, v, p) for b, v in (("8", "4099"), ("3", "997")) for p in ("0.9", "1.0")}
    for case in cases:
        mine = {r["impl"]: r for r in rows if (r["B"], r["V"], r["top_p"]) == case}
        assert set(mine) == {"whole", "blocks of 1 MiB", "blocks of 0 MiB"}, mine
        assert mine["blocks of 0 MiB"]["rows_per_block"] == "1", mine
        assert mine["whole"]["rows_per_block"] == case[0], mine
        whole = float(mine["whole"]["median_ms"])
        for r in mine.values():
            assert float(r["min_ms"]) <= float(r["median_ms"]), r
            assert abs(float(r["vs_whole"]) - whole / float(r["median_ms"])) < 1e-6, r
