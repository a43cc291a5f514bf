"""PNG figures of a run (matplotlib, the `bench` extra; the Agg backend, no display needed).
Missing matplotlib: no figure, and a note in the report saying how to get them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

NO_MATPLOTLIB = 'figures skipped: matplotlib is not installed (pip install "fastllava[bench]")'


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cdf(path: Path, title: str, xlabel: str, series: dict[str, Sequence[float]]) -> Path | None:
    """Empirical CDF of each series (ms), one line per label."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs in series.items():
        xs = sorted(xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel="fraction of samples", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def lines(path: Path, title: str, xlabel: str, x: Sequence[float],
          panels: dict[str, dict[str, Sequence[float | None]]]) -> Path | None:
    """One subplot per panel (its y label), one line per series, against the swept x."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for label, ys in series.items():
            pts = [(a, b) for a, b in zip(x, ys) if b is not None and b == b]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, plt, path)


def bars(path: Path, title: str, labels: Sequence[str], values: Sequence[float],
         ylabel: str, ceiling: float | None = None) -> Path | None:
    """Horizontal bars (e.g. kernels in % of their roofline), with the ceiling as a line."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    if ceiling is not None:
        ax.axvline(ceiling, color="red", linestyle="--", label="measured ceiling")
        ax.legend(fontsize=8)
    ax.set(title=title, xlabel=ylabel)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
