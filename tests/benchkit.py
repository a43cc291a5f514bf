"""Checks shared by the benchmark tests: a `fastllava bench` results folder holds report.md,
results.csv and results.json whose every row carries the run record, and its figures are real
PNGs; the bench scripts' markdown tables are read back by `table_rows`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

PROVENANCE = ("machine", "gpu", "commit", "date", "fastllava", "torch", "triton", "cuda",
              "python", "command")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def describe(proc) -> str:
    """A finished subprocess's exit status and output tails, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout tail\n{proc.stdout[-3000:]}\n--- stderr tail\n" \
           f"{proc.stderr[-3000:]}"


def table_rows(text: str, columns: int, key: int, keys) -> list[list[str]]:
    """Cells of the markdown table rows `| a | b | ... |` with `columns` cells whose cell `key`
    is one of `keys`."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == columns and cells[key] in keys:
            rows.append(cells)
    return rows


def check_results(folder: Path, command_has: str) -> dict:
    """The results.json of folder, after checking the three files agree and carry provenance."""
    names = sorted(p.name for p in folder.iterdir())
    for name in ("report.md", "results.csv", "results.json"):
        assert name in names, f"{name} missing from {folder}: {names}"
    data = json.loads((folder / "results.json").read_text())
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and len(rows) == len(data["rows"]), (len(rows), len(data["rows"]))
    for row in rows + data["rows"]:
        missing = [k for k in PROVENANCE if not row.get(k)]
        assert not missing, f"row lacks {missing}: {row}"
        assert command_has in row["command"], row["command"]
    report = (folder / "report.md").read_text()
    assert all(f"- {k}: `" in report for k in PROVENANCE), report[:800]
    assert data["figures"], f"no figure written: {data['notes']}"
    for name in data["figures"]:
        png = (folder / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 2000, (name, len(png))
        assert f"]({name})" in report, f"report does not show {name}"
    return data


def rows_of(data: dict, table: str) -> list[dict]:
    """The rows of one table of a results.json (its records carry their table's name)."""
    return [r for r in data["rows"] if r["table"] == table]


def monotone_percentiles(row: dict, metrics=("ttft", "itl", "e2e")) -> None:
    for m in metrics:
        ps = [row[f"{m}_p{q}_ms"] for q in (50, 90, 99)]
        assert all(p is not None and p >= 0 for p in ps), (m, ps, row)
        assert ps == sorted(ps), f"{m} percentiles out of order: {ps}"
