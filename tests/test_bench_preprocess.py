"""bench/preprocess.py --smoke: the preprocessing benchmark runs end to end on the CPU (two tiny
sizes, 1 repeat), checks every fastllava row bit-identical to today's PIL path, reports a timed row
for each implementation and peer and both cache-key costs, and writes the .md / .csv run record.
No timing asserts."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from benchkit import describe, table_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "preprocess.py"
COLUMNS = 7
IMPLS = {"today (PIL + fp32-tile hash)", "fastllava cpu", "fastllava torch-cpu", "key: image_key (BLAKE3, uint8 pixels)",
         "key: old BLAKE2b of fp32 tiles"}
PEERS = {"next-336": "transformers LlavaNextImageProcessorPil", "llava-336": "transformers CLIPImageProcessorPil"}
SIZES = {"64x48", "37x101"}






def test_smoke_times_every_impl_and_writes_the_run_record(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert "ERROR" not in proc.stdout, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 0, SIZES)
    seen = {(size, config, impl) for size, config, impl, *_ in rows}
    want = {(s, c, i) for s in SIZES for c in PEERS for i in IMPLS | {PEERS[c]}}
    assert want <= seen, f"missing rows: {sorted(want - seen)}"
    for size, config, impl, median, low, vs_today, note in rows:
        assert float(median) > 0 and float(low) > 0, (size, config, impl, median)
        assert (vs_today == "-") == impl.startswith("key"), (impl, vs_today)

    md, csv_path = sorted(tmp_path.glob("preprocess-*.md")), sorted(tmp_path.glob("preprocess-*.csv"))
    assert len(md) == 1 and len(csv_path) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = md[0].read_text()
    for field in ("device", "commit", "date", "torch", "pillow", "command"):
        assert f"- {field}: `" in text, field
    with open(csv_path[0], newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) and {r["impl"] for r in records} >= IMPLS, records[:2]
    assert all(r["command"].endswith("--smoke --out " + str(tmp_path)) for r in records)
