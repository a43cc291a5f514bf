"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Recorded per finished request (queue jobs by the worker, direct routes by the HTTP layer):
time to first token, end-to-end latency, completion tokens, outcome; direct requests stopped early
because their client went away count as cancelled. Gauges (queue depth, running jobs) are read from
the job store when /metrics is scraped, engine counters (prompt and generated tokens, prefix-cache
lookups, KV use) from `LLaVA.stats()`.
"""

from __future__ import annotations

import math
import threading

# Seconds. TTFT on a GPU is tens of ms; on the CPU test models it is ms; slow hosts reach seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative-bucket histogram; not thread-safe by itself (Metrics holds the lock)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


def _num(x: float) -> str:
    """A sample value / bucket bound as Prometheus reads it ("0.005", "1.0", "+Inf")."""
    return "+Inf" if math.isinf(x) and x > 0 else repr(float(x))


class Metrics:
    """Thread-safe request metrics. `record` is the worker's interface (see the server brief)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.requests = {"ok": 0, "error": 0}
        self.completion_tokens = 0
        self.last_tokens_per_s = 0.0
        self.direct_running = 0  # sync / stream / OpenAI requests in flight (not in the queue)
        self.cancelled = 0       # direct requests whose client left before the end

    def record(self, ttft_s: float | None, latency_s: float, completion_tokens: int,
               ok: bool) -> None:
        """One finished request. ttft_s None: no token was produced (errors before the first)."""
        with self._lock:
            self.requests["ok" if ok else "error"] += 1
            self.latency.observe(max(0.0, latency_s))
            if ttft_s is not None:
                self.ttft.observe(max(0.0, ttft_s))
            self.completion_tokens += max(0, int(completion_tokens))
            decode_s = latency_s - (ttft_s or 0.0)
            if completion_tokens > 1 and decode_s > 0:
                self.last_tokens_per_s = (completion_tokens - 1) / decode_s

    def enter(self) -> None:
        with self._lock:
            self.direct_running += 1

    def leave(self, cancelled: bool = False) -> None:
        with self._lock:
            self.direct_running -= 1
            self.cancelled += int(cancelled)

    def render(self, counts: dict[str, int], engine: dict | None = None) -> str:
        """The exposition text; `counts` is the store's {"IN_QUEUE": n, "IN_PROGRESS": m},
        `engine` LLaVA.stats()."""
        with self._lock:
            lines = [
                "# HELP fastllava_queue_depth Jobs waiting in the queue.",
                "# TYPE fastllava_queue_depth gauge",
                f"fastllava_queue_depth {counts.get('IN_QUEUE', 0)}",
                "# HELP fastllava_running Requests being processed (queue jobs and direct calls).",
                "# TYPE fastllava_running gauge",
                f"fastllava_running {counts.get('IN_PROGRESS', 0) + self.direct_running}",
                "# HELP fastllava_requests_total Finished requests by outcome.",
                "# TYPE fastllava_requests_total counter",
                *(f'fastllava_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()),
                "# HELP fastllava_cancelled_total Direct requests (run, stream, OpenAI) stopped "
                "early because the client disconnected.",
                "# TYPE fastllava_cancelled_total counter",
                f"fastllava_cancelled_total {self.cancelled}",
                "# HELP fastllava_completion_tokens_total Tokens generated (rate() = tokens/s).",
                "# TYPE fastllava_completion_tokens_total counter",
                f"fastllava_completion_tokens_total {self.completion_tokens}",
                "# HELP fastllava_decode_tokens_per_second Decode speed of the last request.",
                "# TYPE fastllava_decode_tokens_per_second gauge",
                f"fastllava_decode_tokens_per_second {_num(self.last_tokens_per_s)}",
                "# HELP fastllava_ttft_seconds Time to first token.",
                "# TYPE fastllava_ttft_seconds histogram",
                *self.ttft.lines("fastllava_ttft_seconds"),
                "# HELP fastllava_latency_seconds Request latency, start to last token.",
                "# TYPE fastllava_latency_seconds histogram",
                *self.latency.lines("fastllava_latency_seconds"),
                *(_engine_lines(engine) if engine else []),
            ]
        return "\n".join(lines) + "\n"


_ENGINE_COUNTERS = (  # LLaVA.stats() key, metric name, help
    ("prompt_tokens", "fastllava_prompt_tokens_total",
     "Prompt tokens prefilled (cache hits excluded)."),
    ("generation_tokens", "fastllava_generation_tokens_total", "Tokens sampled by the engine."),
    ("prefix_query_tokens", "fastllava_prefix_cache_queries_total",
     "Tokens looked up in the prefix cache at admission."),
    ("prefix_hit_tokens", "fastllava_prefix_cache_hits_total",
     "Tokens found in the prefix cache (hits / queries = hit rate)."),
)


def _engine_lines(stats: dict) -> list[str]:
    lines = []
    for key, name, help_ in _ENGINE_COUNTERS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {stats[key]}"]
    usage = stats["kv_pages_used"] / stats["kv_pages_total"]
    return lines + [
        "# HELP fastllava_kv_pages_used KV-cache pages held by requests.",
        "# TYPE fastllava_kv_pages_used gauge",
        f"fastllava_kv_pages_used {stats['kv_pages_used']}",
        "# HELP fastllava_kv_pages_total KV-cache pages in the pool.",
        "# TYPE fastllava_kv_pages_total gauge",
        f"fastllava_kv_pages_total {stats['kv_pages_total']}",
        "# HELP fastllava_kv_cache_usage_ratio KV-cache pages in use / all pages.",
        "# TYPE fastllava_kv_cache_usage_ratio gauge",
        f"fastllava_kv_cache_usage_ratio {_num(usage)}",
        "# HELP fastllava_engine_sequences Sequences in the engine by state.",
        "# TYPE fastllava_engine_sequences gauge",
        f'fastllava_engine_sequences{{state="running"}} {stats["running"]}',
        f'fastllava_engine_sequences{{state="waiting"}} {stats["waiting"]}',
    ]
