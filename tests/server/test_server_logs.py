"""What `fastllava serve` logs, read from the real server's piped stderr: the startup block with
every field, the no-auth warning only for non-loopback binds, a stats line while busy (sane
values, none while idle), and no carriage returns from progress bars."""

from __future__ import annotations

import logging
import re
import threading
import time

import httpx
import pytest

from fastllava.server.serverlog import AccessLogRedaction, is_loopback, redact_webhook
from serverkit import API_KEY

EP = "fal-ai/llavav15-13b"
STARTUP_FIELDS = ("model", "endpoint id", "device", "dtype", "backend", "weights", "KV cache",
                  "max context", "max concurrent sequences", "CUDA graphs", "prefix caching",
                  "queue", "auth", "metrics", "URLs")
STATS = re.compile(r"running: (\d+) reqs, waiting: (\d+) reqs, queued: (\d+) jobs, "
                   r"prompt: ([\d.]+) tokens/s, generation: ([\d.]+) tokens/s, "
                   r"KV cache: ([\d.]+)% used, prefix cache hit rate: (.*)$")
NO_AUTH = "no API key is set"


def startup_block(log: str) -> dict[str, str]:
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("fastllava serving"))
    fields = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        name, _, value = line.strip().partition(": ")
        fields[name] = value
    return fields


def stats_lines(log: str) -> list[tuple]:
    return [m.groups() for m in map(STATS.search, log.splitlines()) if m]


@pytest.fixture(scope="module")
def busy_server(server_factory, tiny_llava):
    """Bound to every interface without a key; stats every 0.3 s; INFO logs."""
    return server_factory(tiny_llava, "--host", "0.0.0.0", "--log-level", "info",
                          "--stats-interval-s", "0.3", "--queue-concurrency", "2")


def test_startup_block_lists_every_field(busy_server, tiny_llava):
    fields = startup_block(busy_server.log_text())
    assert set(STARTUP_FIELDS) <= set(fields), (set(STARTUP_FIELDS) - set(fields), fields)
    assert fields["model"].startswith(str(tiny_llava)) and fields["endpoint id"] == EP
    assert fields["device"] == "cpu" and fields["dtype"] == "float32", fields
    assert fields["auth"] == "off" and fields["metrics"] == "open", fields
    kv = re.fullmatch(r"(\d+) tokens \((\d+) pages of 16\), ([\d.e-]+) GiB", fields["KV cache"])
    assert kv and int(kv[1]) == 16 * int(kv[2]) and float(kv[3]) > 0, fields["KV cache"]
    weights = re.fullmatch(r"([\d.e-]+) GiB", fields["weights"])
    assert weights and float(weights[1]) > 0, fields["weights"]
    assert re.fullmatch(r"\d+ tokens", fields["max context"]), fields
    assert fields["CUDA graphs"].startswith("off"), fields   # CPU
    assert fields["queue"].startswith("sqlite:///"), fields
    base = f"http://0.0.0.0:{busy_server.port}"
    for url in (base, f"{base}/docs", f"{base}/health", f"{base}/metrics"):
        assert url in fields["URLs"], fields["URLs"]


def test_no_auth_warning_only_beyond_loopback(busy_server, lenient_server, server_factory,
                                              tiny_llava):
    assert NO_AUTH in busy_server.log_text()          # 0.0.0.0, no key
    assert NO_AUTH not in lenient_server.log_text()   # 127.0.0.1, no key
    keyed = server_factory(tiny_llava, "--host", "0.0.0.0", "--api-key", API_KEY)
    assert NO_AUTH not in keyed.log_text()
    fields = startup_block(server_factory(tiny_llava, "--log-level", "info", "--api-key",
                                          API_KEY, "--metrics-open").log_text())
    assert fields["auth"] == "on (1 API key)" and fields["metrics"] == "open", fields
    assert [h for h in ("localhost", "127.0.0.1", "127.8.0.1", "::1", "[::1]") if
            not is_loopback(h)] == []
    assert [h for h in ("0.0.0.0", "::", "10.0.0.1", "llava.internal") if is_loopback(h)] == []


def test_stats_line_while_busy_and_quiet_when_idle(busy_server, data_uri):
    idle_before = len(stats_lines(busy_server.log_text()))
    time.sleep(1.0)   # idle: 3 ticks, no line
    assert len(stats_lines(busy_server.log_text())) == idle_before
    body = {"image_url": data_uri, "prompt": "Describe the image.", "max_tokens": 300,
            "temperature": 0}
    errors = []

    def run():
        try:
            with httpx.Client(base_url=busy_server.url, timeout=120) as c:
                for _ in range(3):   # identical prompts: the 2nd and 3rd hit the prefix cache
                    assert c.post(f"/{EP}", json=body).status_code == 200
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=busy_server.url, timeout=60) as c:
        queued = [c.post(f"/queue/{EP}", json=body).json() for _ in range(3)]
        for t in threads:
            t.join(120)
        for job in queued:
            while c.get(job["status_url"]).status_code != 200:
                time.sleep(0.05)
        metrics = c.get("/metrics").text
    assert not errors, errors
    time.sleep(0.8)   # the tick after the last step reports it
    lines = stats_lines(busy_server.log_text())[idle_before:]
    assert lines, busy_server.log_text()[-2000:]
    for running, waiting, queued_, prompt, generation, kv, hits in lines:
        assert 0 <= float(kv) <= 100 and float(prompt) >= 0 and float(generation) >= 0, lines
        assert hits == "n/a" or 0 <= float(hits.rstrip("%")) <= 100, lines
    assert max(float(g) for *_, g, _kv, _h in lines) > 0, lines
    assert max(int(r) for r, *_ in lines) >= 1, lines
    assert any(h.endswith("%") and float(h[:-1]) > 0 for *_, h in lines), lines
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line and not line.startswith("#"))
    assert int(samples["fastllava_generation_tokens_total"]) >= 9, metrics
    assert int(samples["fastllava_prompt_tokens_total"]) > 0
    assert 0 < int(samples["fastllava_prefix_cache_hits_total"]) < int(
        samples["fastllava_prefix_cache_queries_total"])

    settled = len(stats_lines(busy_server.log_text()))
    time.sleep(1.2)   # 4 idle ticks
    assert len(stats_lines(busy_server.log_text())) == settled, "stats lines while idle"


def test_access_log_keeps_webhook_credentials_out(busy_server):
    """A submit whose fal_webhook carries userinfo and a token (refused here for its empty
    body: the access line is written all the same) is logged without either."""
    hook = "https://hook-user:hook-pass@hooks.example.com/in?token=hook-token"
    with httpx.Client(base_url=busy_server.url, timeout=30) as c:
        r = c.post(f"/queue/{EP}", params={"fal_webhook": hook, "probe": "access-log"}, json={})
    assert r.status_code == 422, r.text
    deadline = time.monotonic() + 5
    while "probe=access-log" not in busy_server.log_text():
        assert time.monotonic() < deadline, busy_server.log_text()[-2000:]
        time.sleep(0.05)
    (line,) = [x for x in busy_server.log_text().splitlines() if "probe=access-log" in x]
    assert "hooks.example.com/in" in line and "hook-" not in line, line


def test_piped_stderr_has_no_carriage_returns(busy_server, lenient_server):
    for server in (busy_server, lenient_server):
        raw = server.log_path.read_bytes()
        assert b"loading weights" in raw and b"\r" not in raw, raw[:500]


def test_stats_interval_flag_is_checked(tiny_llava):
    from fastllava.cli import main

    assert main(["serve", "--model", str(tiny_llava), "--stats-interval-s", "-1"]) == 2


def test_cuda_fields_name_the_gpu_and_graphs(monkeypatch):
    """The CUDA-only parts of the block, with a stand-in engine (CI has no GPU)."""
    import types

    import torch

    from fastllava.server import serverlog

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    buckets = [1, 2, 4, 8, 16, 32, 64]
    graphs = types.SimpleNamespace(buckets=buckets, graphs=dict.fromkeys(buckets))   # captured
    llava = types.SimpleNamespace(device=torch.device("cuda:0"),
                                  runtime=types.SimpleNamespace(cuda_graphs=True),
                                  engine=types.SimpleNamespace(
                                      runner=types.SimpleNamespace(graphs=graphs)))
    assert serverlog._device(llava) == "cuda:0 (NVIDIA H200)"
    assert serverlog._cuda_graphs(llava) == "on (batch sizes 1..64)"
    graphs.graphs = {}       # buckets built, none captured (tensor parallelism, torch backend)
    assert serverlog._cuda_graphs(llava).startswith("off (CUDA + triton")
    llava.engine.runner.graphs = None
    assert serverlog._cuda_graphs(llava).startswith("off (CUDA + triton")
    llava.runtime.cuda_graphs = False
    assert serverlog._cuda_graphs(llava) == "off (--no-cuda-graphs)"
    assert serverlog.redact_url("redis://u:pw@h:6379/0") == "redis://u:***@h:6379/0"
    assert serverlog.redact_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.parametrize("url, shown", [
    ("https://u:p@hooks.example.com:8443/in?token=abc#x", "https://hooks.example.com:8443/in?***"),
    ("http://[::1]:9/h", "http://[::1]:9/h"),
    ("https://hooks.example.com", "https://hooks.example.com"),
    ("http://[bad", "<not a URL>"),
])
def test_redact_webhook(url, shown):
    assert redact_webhook(url) == shown


def test_access_log_shows_fal_webhook_without_credentials():
    """uvicorn's access record for a submit with a webhook: the rest of the line unchanged."""
    path = (f"/{EP}?x=1&fal_webhook=https%3A%2F%2Fu%3Asecret%40hooks.example.com%2Fin"
            "%3Ftoken%3Dt0k")
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d', ("1.2.3.4:5", "POST", path, "1.1", 200),
                               None)
    assert AccessLogRedaction().filter(record)
    line = record.getMessage()
    assert "secret" not in line and "t0k" not in line, line
    assert line == (f'1.2.3.4:5 - "POST /{EP}?x=1&fal_webhook=https://hooks.example.com/in%3F***'
                    ' HTTP/1.1" 200'), line
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                              ("1.2.3.4:5", "GET", "/health?fal_webhookx", "1.1", 200), None)
    assert AccessLogRedaction().filter(plain) and "/health?fal_webhookx" in plain.getMessage()
