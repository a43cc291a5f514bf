"""Provenance and output of one benchmark run: every row written carries the machine, GPU,
commit, date, versions and the command (docs/performance.md "Method"), in a results folder per
run holding report.md, results.csv, results.json and the PNG figures."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

PACKAGE_DIR = Path(__file__).resolve().parents[1]      # engine/ in a checkout, site-packages/fastllava installed


def _git(*args: str) -> str:
    try:
        return subprocess.run(("git", *args), cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    """Short commit of the checkout the package runs from (+ "-dirty"), "" outside git."""
    head = _git("rev-parse", "--short", "HEAD")
    if head and _git("status", "--porcelain", "--untracked-files=no"):
        head += "-dirty"
    return head


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(argv: Sequence[str]) -> dict[str, str]:
    """The run record; argv: the command line after `fastllava`. Imports torch lazily."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"
    gpu, cuda = "none", "none"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
        cuda = torch.version.cuda or "none"
    except ImportError:
        pass
    return {"machine": f"{platform.node()} ({cpu_name()}, {os.cpu_count()} cores)",
            "gpu": gpu, "commit": commit() or "not a git checkout",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "fastllava": ver("fastllava"), "torch": ver("torch"), "triton": ver("triton"),
            "cuda": cuda, "python": platform.python_version(),
            "command": shlex.join(["fastllava", *argv])}


def default_out(subcommand: str) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{subcommand}-{stamp}"


def fmt(x: object) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.0f}"
    return str(x).replace("|", "/")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class Results:
    """One run's folder. `add(name, rows, columns)` collects a table; `write()` writes
    report.md (run record, each table, notes, figures), results.csv and results.json (one
    record per row: provenance + table name + the row's fields)."""

    def __init__(self, out: Path, title: str, record: dict[str, str]):
        self.out, self.title, self.record = Path(out), title, record
        self.tables: list[tuple[str, list[dict], list[str]]] = []
        self.notes: list[str] = []
        self.figures: list[Path] = []
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, rows: list[dict], columns: Sequence[str]) -> None:
        self.tables.append((name, rows, list(columns)))

    def records(self) -> list[dict]:
        return [{**self.record, "table": name, **{c: _jsonable(r.get(c)) for c in cols}}
                for name, rows, cols in self.tables for r in rows]

    def write(self) -> list[Path]:
        meta = "\n".join(f"- {k}: `{v}`" for k, v in self.record.items())
        parts = [f"# {self.title}\n\n{meta}\n"]
        parts += [f"## {name}\n\n{markdown_table(rows, cols)}\n" for name, rows, cols in self.tables]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes) + "\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in self.figures]
        md, csv_path, js = (self.out / n for n in ("report.md", "results.csv", "results.json"))
        md.write_text("\n".join(parts))
        records = self.records()
        fields = list(dict.fromkeys(k for r in records for k in r))
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(records)
        js.write_text(json.dumps({"record": self.record, "rows": records, "notes": self.notes,
                                  "figures": [p.name for p in self.figures]}, indent=1))
        return [md, csv_path, js, *self.figures]
