"""bench/decode.py's results: each row's tok/s, GB/s (the bytes a step reads), % of the copy
ceiling, speed against the fastllava engine and pass/fail bars; the table's cells and the
Markdown report, with one line per fp8 variant comparing its tok/s to the model dtype's."""

from __future__ import annotations

from common import fmt, markdown, variant_suffix
from decode_plan import ENGINE, HF_COMPILED, HF_EAGER, OVERLAP, REPLAY, Plan, Row

from fastllava.benchmarks.common import step_bytes

BW_BARS = {1: 0.90, 8: 0.85, 32: 0.80}   # performance.md: fraction of copy bandwidth, by batch
PEER_BAR = 1.5                            # ... and >= 1.5x the compiled static-cache peer
FP8_TARGET = 1.7                          # issue 15: FP8-weight batch-1 decode tok/s vs bf16 (34B)


def finish(rows: list[Row], t, plan: Plan, copy_gb_s: float | None) -> list[Row]:
    """Fill tok/s, GB/s, % of the copy, speedups and bars; order rows by batch, then impl."""
    order = [i + variant_suffix(v) for v in plan.variants for i in (ENGINE, OVERLAP, REPLAY)]
    order += [HF_EAGER, HF_COMPILED]
    rows.sort(key=lambda r: (r.B, order.index(r.impl)))
    engine = {r.B: r for r in rows if r.impl == ENGINE and r.ms}
    for r in rows:
        if r.ms is None:
            continue
        r.tok_s = r.B * 1e3 / r.ms
        ours = r.impl.startswith("fastllava")
        quantization, kv = r.variant   # fp8 linears / KV pages: one byte per weight / element
        r.gb_s = step_bytes(t, r.B, r.ctx, plan.dtype.itemsize,
                            1 if quantization == "fp8" else None,
                            1 if kv == "fp8" else None) / r.ms / 1e6
        # Under tensor parallelism N GPUs read the step's bytes: their ceiling is N copies.
        gpus = plan.tensor_parallel_size if ours else 1
        r.pct = r.gb_s / (copy_gb_s * gpus) if copy_gb_s else None
        r.vs = r.ms / engine[r.B].ms if r.B in engine else None
        if r.impl.startswith((ENGINE, OVERLAP)) and r.pct is not None and r.B in BW_BARS:
            r.bar = f">={BW_BARS[r.B]:.0%} BW: {'yes' if r.pct >= BW_BARS[r.B] else 'NO'}"
        if r.impl == HF_COMPILED and r.vs is not None:
            r.bar = f"fastllava >={PEER_BAR}x: {'yes' if r.vs >= PEER_BAR else 'NO'}"
    return rows


COLUMNS = ("model", "B", "context", "impl", "mean ctx", "ms/step", "tok/s", "GB/s", "% copy",
           "ms / engine ms", "bar", "note")


def cells(r: Row, model: str, context: int) -> tuple:
    pct = None if r.pct is None else f"{100 * r.pct:.1f}%"
    return (model, r.B, context, r.impl, r.ctx, r.ms, r.tok_s, r.gb_s, pct, r.vs, r.bar or None,
            r.note or None)


def ratio_lines(rows: list[Row], plan: Plan, B: int = 1) -> list[str]:
    """Per non-model-dtype variant: its engine tok/s at batch B / the model-dtype engine's."""
    tok_s = {r.variant: r.tok_s for r in rows if r.impl.startswith(ENGINE) and r.B == B}
    base, lines = tok_s.get(plan.variants[0]), []
    for v in plan.variants[1:]:
        name = variant_suffix(v).strip(" ()")
        ratio = f"{tok_s[v] / base:.2f}x" if base and tok_s.get(v) else "n/a (not measured)"
        target = f" (target >= {FP8_TARGET}x for 34B)" if v == ("fp8", "auto") else ""
        lines.append(f"- {name} / model dtype decode tok/s at B={B}: {ratio}{target}")
    return lines


def gap_lines(rows: list[Row]) -> list[str]:
    """Per batch and variant with a timed graph replay: each engine loop's ms/step minus the
    replay's (the GPU-idle gap per step; the replay is the same step's graph alone)."""
    ms = {(r.impl, r.B): r.ms for r in rows if r.ms is not None}
    lines = []
    for r in rows:
        if not r.impl.startswith(REPLAY) or r.ms is None:
            continue
        suffix = r.impl[len(REPLAY):]
        gaps = [f"{name} {ms[(impl + suffix, r.B)] - r.ms:+.3f} ms"
                for name, impl in (("serial", ENGINE), ("overlapped", OVERLAP))
                if (impl + suffix, r.B) in ms]
        if gaps:
            lines.append(f"- GPU-idle gap per step{suffix} at B={r.B} (engine ms/step - graph "
                         f"replay's {r.ms:.3f} ms): " + ", ".join(gaps))
    return lines


def report(header: dict, ceilings, rows: list[Row], model: str, context: int,
           ratios: list[str] = ()) -> str:
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    ceil = markdown(ceilings) if ceilings else "skipped (--smoke: no GPU)"
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(fmt(c) for c in cells(r, model, context)) + " |" for r in rows]
    legend = ("GB/s: weights read once per step + KV at the mean context. % copy: of the copy "
              "ceiling (x N GPUs for the fastllava rows at tensor_parallel_size N). ms / engine "
              "ms > 1: the fastllava engine (model-dtype weights and KV) is faster; an fp8 row "
              "below 1 is faster than it. Bars (performance.md, "
              f"H100): batch 1/8/32 >= 90/85/80% of the copy, >= {PEER_BAR}x the compiled peer.")
    summary = "\n\n" + "\n".join(ratios) if ratios else ""
    return (f"# Decode benchmark\n\n{meta}\n\n## Ceiling (measured in this run)\n\n{ceil}\n\n"
            f"## Decode steps\n\n{legend}\n\n" + "\n".join(table) + summary + "\n")
