"""Per-request traces → the serving figures. Times are `time.perf_counter()` seconds taken on
the client; figures are reported in ms.

TTFT = first streamed event carrying output minus the submit time (a protocol that does not
stream: the whole response, so TTFT = e2e). ITL = the gap between successive output events, one
sample per gap (vLLM's benchmark_serving convention: an event is an SSE chunk, or a fal snapshot
whose text grew). TPOT = (e2e - TTFT) / (output tokens - 1) per request. Goodput = requests per
second that met every SLO given (`ttft`, `itl` = the request's mean ITL gap,
`e2e`), counted over the same wall time as the throughput.
"""

from __future__ import annotations

import dataclasses
import math

QUANTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "itl", "e2e")


@dataclasses.dataclass
class Trace:
    """One request: submit time, arrival time of every output event, end time, output tokens
    (None when the protocol does not say), or the error that ended it."""
    submit: float
    events: list[float] = dataclasses.field(default_factory=list)
    end: float | None = None
    tokens: int | None = None
    error: str = ""

    @property
    def ttft(self) -> float:
        return (self.events[0] if self.events else self.end) - self.submit

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:])]


def percentile(xs: list[float], q: float) -> float:
    """q in [0, 100]; linear interpolation between closest ranks (numpy's default); nan if empty."""
    if not xs:
        return math.nan
    xs = sorted(xs)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_slo(text: str | None) -> dict[str, float]:
    """"ttft=0.5,itl=0.05" (seconds) → {"ttft": 0.5, "itl": 0.05}."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {part!r} is not KEY=SECONDS") from None
        if not sep or key not in SLO_KEYS or not slo[key] > 0:
            raise ValueError(f"--slo: {part!r}: keys are {', '.join(SLO_KEYS)}, values seconds > 0")
    return slo


def meets(t: Trace, slo: dict[str, float]) -> bool:
    itl = sum(t.itls) / len(t.itls) if t.itls else 0.0
    got = {"ttft": t.ttft, "itl": itl, "e2e": t.end - t.submit}
    return all(got[k] <= limit for k, limit in slo.items())


def summarize(traces: list[Trace], slo: dict[str, float]) -> dict:
    """One row: counts, wall time, throughputs, latency percentiles (ms), goodput."""
    ok = [t for t in traces if not t.error]
    row: dict = {"requests": len(traces), "ok": len(ok), "errors": len(traces) - len(ok)}
    wall = (max(t.end for t in ok) - min(t.submit for t in traces)) if ok else math.nan
    counted = [t.tokens for t in ok if t.tokens is not None]
    tokens = sum(counted) if counted else None
    row.update(wall_s=wall, req_per_s=len(ok) / wall if ok else 0.0,
               out_tok_per_s=tokens / wall if tokens is not None and ok else None,
               out_tokens=tokens)
    series = {"ttft": [t.ttft for t in ok], "itl": [x for t in ok for x in t.itls],
              "e2e": [t.end - t.submit for t in ok],
              "tpot": [(t.end - t.submit - t.ttft) / (t.tokens - 1) for t in ok
                       if t.tokens and t.tokens > 1]}
    for name, xs in series.items():
        for q in QUANTILES:
            row[f"{name}_p{q}_ms"] = 1e3 * percentile(xs, q)
    good = sum(meets(t, slo) for t in ok)
    row["slo_met"] = good if slo else None
    row["goodput_req_per_s"] = good / wall if slo and ok else None
    return row
