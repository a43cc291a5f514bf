"""What `fastllava serve` tells its operator, like `vllm serve`: one startup block (what was loaded,
how big, where to reach it), a warning when an open server listens beyond loopback, and a stats
line every `stats_interval_s` while there is work (throughput over the interval, queue, KV use,
prefix-cache hit rate since start).

Everything goes through the logger "fastllava.server" at INFO (the warning at WARNING), so
`--log-level warning` keeps only the warning. The stats line reads the engine's own counters
(`LLaVA.stats()`: plain ints the engine thread increments), so logging costs the engine loop
nothing; the reporter runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.concurrency import run_in_threadpool

log = logging.getLogger("fastllava.server")
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"


def configure_logging(level: str) -> None:
    """Root logging for `fastllava serve`: level name, timestamps (stats lines need them)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt=DATE_FORMAT)


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a hostname or 0.0.0.0 / :: : reachable from elsewhere


def base_url(settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = "https" if settings.tls_cert else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{scheme}://{host}:{settings.port}"


def redact_webhook(url: str) -> str:
    """A webhook URL as logs show it: scheme, host, port and path. Its userinfo, query and
    fragment are dropped (webhook receivers commonly authenticate with a token in one of them)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<not a URL>"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


class AccessLogRedaction(logging.Filter):
    """uvicorn's access log line shows the request's path with its query string: a submit's
    fal_webhook parameter is shown as `redact_webhook` gives it. The record's args are uvicorn's
    (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) \
                and "fal_webhook" in args[2]:
            path, _, query = args[2].partition("?")
            pairs = [(k, redact_webhook(v) if k == "fal_webhook" else v)
                     for k, v in parse_qsl(query, keep_blank_values=True)]
            record.args = (*args[:2], f"{path}?{urlencode(pairs, safe=':/*[]')}", *args[3:])
        return True


def redact_access_log() -> None:
    """Installs AccessLogRedaction on uvicorn's access logger (once; uvicorn configures its
    loggers before the app starts, so the lifespan calls this)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogRedaction) for f in access.filters):
        access.addFilter(AccessLogRedaction())


def redact_url(url: str) -> str:
    """A queue URL without its password (redis://user:secret@host → redis://user:***@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _size(num_bytes: int) -> str:
    """GiB always (one unit to compare and parse); 2 significant digits below 0.01 GiB."""
    gib = num_bytes / 2**30
    return f"{gib:.2f} GiB" if gib >= 0.01 else f"{gib:.2g} GiB"


def _device(llava) -> str:
    device, tp = llava.device, getattr(llava, "tensor_parallel_size", 1)
    ranks = f" + {tp - 1} tensor-parallel worker rank(s)" if tp > 1 else ""
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)}){ranks}"
    return f"{device}{ranks}"


def _cuda_graphs(llava) -> str:
    graphs = llava.engine.runner.graphs
    if graphs is not None and graphs.graphs:   # (tensor parallelism builds uncaptured buckets)
        return f"on (batch sizes {min(graphs.buckets)}..{max(graphs.buckets)})"
    if not llava.runtime.cuda_graphs:
        return "off (--no-cuda-graphs)"
    return "off (CUDA + triton backend only)"


def startup_lines(app) -> list[str]:
    """The startup block, one "name: value" per line."""
    s, llava = app.state.settings, app.state.llava
    rc, kv = llava.runtime, llava.engine.runner.kv
    weights = sum(p.numel() * p.element_size() for p in llava.model.parameters())
    kv_bytes = sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v))
    keys = len(s.api_keys)
    base = base_url(s)
    return [
        f"model: {s.model} (LLaVA-{'NeXT' if llava.config.kind == 'next' else '1.5'})",
        f"endpoint id: {app.state.endpoint_id}",
        f"device: {_device(llava)}",
        f"dtype: {str(llava.dtype).removeprefix('torch.')}"
        + (" (decoder linear layers fp8)" if llava.quantization == "fp8" else ""),
        f"backend: {llava.ops.name}",
        f"weights: {_size(weights)}",
        f"KV cache: {kv.num_pages * kv.page_size} tokens ({kv.num_pages} pages of "
        f"{kv.page_size}), {_size(kv_bytes)}"
        + (", fp8 e4m3 pages" if rc.kv_cache_dtype == "fp8" else ""),
        f"max context: {llava.max_len} tokens",
        f"max concurrent sequences: {rc.max_num_seqs} ({rc.max_num_batched_tokens} tokens/step)",
        f"CUDA graphs: {_cuda_graphs(llava)}",
        f"prefix caching: {'on' if rc.prefix_caching else 'off'}",
        f"queue: {redact_url(s.resolved_queue_url)} ({s.queue_concurrency} jobs at once)",
        f"auth: {f'on ({keys} API key' + ('s)' if keys > 1 else ')') if keys else 'off'}",
        f"metrics: {'open' if s.metrics_open or not keys else 'behind auth'}",
        f"URLs: base {base}, docs {base}/docs, health {base}/health, metrics {base}/metrics, "
        f"OpenAI {base}/v1",
    ]


def log_startup(app) -> None:
    log.info("fastllava serving\n%s", "\n".join("  " + line for line in startup_lines(app)))
    s = app.state.settings
    if not s.api_keys and not is_loopback(s.host):
        log.warning("no API key is set and the server listens on %s, which is not loopback: "
                    "anyone who can reach it can use it. Set --api-key KEY (or "
                    "FASTLLAVA_API_KEYS), or bind --host 127.0.0.1", s.host)


class StatsReporter:
    """The periodic stats line: rates over the interval since the previous tick. A tick logs
    only when something happened (engine steps ran, or the request counts changed): an idle
    server stays quiet."""

    def __init__(self, llava, store, interval_s: float):
        self.llava, self.store, self.interval_s = llava, store, interval_s
        self._prev: dict | None = None
        self._prev_t = 0.0
        self._last_counts: tuple | None = None

    def snapshot(self) -> dict:
        snap = dict(self.llava.stats())
        try:
            counts = self.store.counts()
        except Exception:  # a store outage is /health's business, not the stats line's
            counts = {}
        snap["queued"], snap["in_progress"] = counts.get("IN_QUEUE"), counts.get("IN_PROGRESS")
        return snap

    def tick(self, snap: dict, now: float) -> str | None:
        """The line for `snap` taken at `now` (None: nothing changed since the last tick)."""
        prev, dt = self._prev, now - self._prev_t
        counts = (snap["running"], snap["waiting"], snap["queued"], snap["in_progress"])
        last_counts, self._last_counts = self._last_counts, counts
        self._prev, self._prev_t = snap, now
        if prev is None or dt <= 0 or (snap["steps"] == prev["steps"] and counts == last_counts):
            return None

        def delta(key):
            return snap[key] - prev[key]

        # Since start (as vLLM's was): a per-interval rate is mostly "no lookups" in decode.
        lookups = snap["prefix_query_tokens"]
        hits = f"{100 * snap['prefix_hit_tokens'] / lookups:.1f}%" if lookups else "n/a"
        if not self.llava.runtime.prefix_caching:
            hits = "off"
        queued = "?" if snap["queued"] is None else snap["queued"]
        kv = 100 * snap["kv_pages_used"] / snap["kv_pages_total"]
        return (f"running: {snap['running']} reqs, waiting: {snap['waiting']} reqs, "
                f"queued: {queued} jobs, prompt: {delta('prompt_tokens') / dt:.1f} tokens/s, "
                f"generation: {delta('generation_tokens') / dt:.1f} tokens/s, "
                f"KV cache: {kv:.1f}% used, prefix cache hit rate: {hits}")

    async def run(self) -> None:
        """Log a line every interval_s while busy; cancelled at shutdown."""
        self.tick(await run_in_threadpool(self.snapshot), time.monotonic())
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                line = self.tick(await run_in_threadpool(self.snapshot), time.monotonic())
            except Exception:  # a bug here must not end the reports for good, nor the server
                log.exception("stats line failed")
                continue
            if line:
                log.info("%s", line)
