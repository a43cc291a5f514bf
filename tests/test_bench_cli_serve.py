"""`fastllava bench serve` against a fake OpenAI-compatible server written here (any server
works; 500s are counted as errors) and against the real fastllava server on loopback (OpenAI
SSE, fal /stream snapshots, fal queue)."""

from __future__ import annotations

import base64
import http.server
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from benchkit import check_results, monotone_percentiles
from fastllava.cli import main

pytestmark = pytest.mark.network
sys.path.insert(0, str(Path(__file__).parent / "server"))
from serverkit import launch_server  # noqa: E402

TOKEN_GAP_S = 0.004


def fake_openai_server():
    """A minimal OpenAI-compatible server: /v1/models, and /v1/chat/completions streaming one
    chunk per token (max_tokens of them, TOKEN_GAP_S apart) then a usage chunk; a prompt
    "FAIL" gets an HTTP 500. Returns (base_url, stop, seen request bodies)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-llava"}]}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({**body, "authorization": self.headers.get("Authorization")})
            if body["messages"][0]["content"][0]["text"] == "FAIL":
                self._send(500, b'{"error": {"message": "boom"}}')
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            n = body["max_tokens"]
            for i in range(n):
                time.sleep(TOKEN_GAP_S)
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            usage = {"choices": [], "usage": {"completion_tokens": n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
    return f"http://127.0.0.1:{httpd.server_address[1]}", stop, seen


def test_any_openai_server_with_errors_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("ok one", "FAIL", "ok two")))
    url, stop, seen = fake_openai_server()
    try:
        code = main(["bench", "serve", "--base-url", url, "--protocol", "openai",
                     "--num-requests", "9", "--concurrency", "1,3", "--prompts", str(prompts),
                     "--max-tokens", "fixed:5", "--image-sizes", "64x48,96x80",
                     "--slo", "ttft=30,itl=30", "--out", str(tmp_path / "out")])
    finally:
        stop()
    assert code == 1, "failed requests must make the exit status non-zero"
    data = check_results(tmp_path / "out", "bench serve --base-url")
    assert sorted(data["figures"]) == ["itl_cdf.png", "sweep.png", "ttft_cdf.png"]
    rows = data["rows"]
    assert [r["point"] for r in rows] == ["concurrency 1", "concurrency 3"]
    assert len(seen) == 1 + 2 * 9, "one warm-up request, then 9 per sweep point"
    assert {b["model"] for b in seen} == {"fake-llava"} and all(b["stream"] for b in seen)
    assert {b["authorization"] for b in seen} == {"Bearer sk-test"}
    image = seen[0]["messages"][0]["content"][1]["image_url"]["url"]
    assert image.startswith("data:image/jpeg;base64,"), image[:40]
    for r in rows:
        assert (r["requests"], r["ok"], r["errors"]) == (9, 6, 3), r
        assert r["out_tokens"] == 30 and r["slo_met"] == 6, r
        monotone_percentiles(r, ("ttft", "itl", "tpot", "e2e"))
        # the server sleeps TOKEN_GAP_S before each of 5 tokens (reads of successive chunks may
        # coalesce on a loaded machine, so single gaps are not bounded below)
        assert r["e2e_p50_ms"] >= 5e3 * TOKEN_GAP_S and r["itl_p99_ms"] >= 1e3 * TOKEN_GAP_S, r
        assert r["ttft_p50_ms"] <= r["e2e_p50_ms"] and r["e2e_p99_ms"] <= 1e3 * r["wall_s"], r
        assert r["req_per_s"] == pytest.approx(6 / r["wall_s"]), r
        assert r["goodput_req_per_s"] == pytest.approx(r["req_per_s"]), r
    assert any("3 failed request(s), first: HTTP 500" in n for n in data["notes"]), data["notes"]


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    srv = launch_server(tiny_llava, tmp_path_factory.mktemp("bench-serve"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("protocol, extra", [
    ("openai", []),
    ("fal", ["--fal-mode", "stream", "--concurrency", "2"]),
    ("fal", ["--fal-mode", "sync"]),
    ("fal", ["--fal-mode", "queue", "--request-rate", "20", "--poll-interval", "0.02"]),
], ids=["openai-sse", "fal-stream", "fal-sync", "fal-queue-rate"])
def test_the_fastllava_server(server, tmp_path, protocol, extra):
    base = server.url + ("/queue" if "queue" in extra else "")
    code = main(["bench", "serve", "--smoke", "--base-url", base, "--protocol", protocol,
                 "--endpoint", "fal-ai/llavav15-13b", *extra, "--out", str(tmp_path)])
    data = check_results(tmp_path, f"--protocol {protocol}")
    (row,) = data["rows"]
    assert code == 0 and (row["requests"], row["ok"], row["errors"]) == (6, 6, 0), data["notes"]
    monotone_percentiles(row, ("ttft", "e2e"))
    assert 0 < row["ttft_p50_ms"] <= row["e2e_p50_ms"], row
    if "stream" not in extra and protocol == "fal":   # no stream: TTFT = e2e, tokens unknown
        assert row["ttft_p50_ms"] == row["e2e_p50_ms"] and row["out_tokens"] is None, row
        assert row["point"] == ("rate 20/s" if "queue" in extra else "concurrency 4"), row
    else:                   # streamed: tokens and inter-token gaps were seen
        assert 6 <= row["out_tokens"] <= 36 and row["out_tok_per_s"] > 0, row
        monotone_percentiles(row, ("itl",))


def test_images_folder_and_prompts_file(tmp_path):
    from serverkit import make_png

    images = tmp_path / "imgs"
    images.mkdir()
    pngs = {make_png(40, 32, seed=1), make_png(50, 20, seed=2)}
    for i, png in enumerate(pngs):
        (images / f"{i}.png").write_bytes(png)
    (images / "notes.txt").write_text("not an image")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "max_tokens": 3}\n\n{"prompt": "b"}\n')
    url, stop, seen = fake_openai_server()
    try:
        code = main(["bench", "serve", "--base-url", url + "/v1", "--num-requests", "4",
                     "--images", str(images), "--prompts", str(prompts), "--max-tokens",
                     "fixed:2", "--warmup", "0", "--out", str(tmp_path / "out")])
    finally:
        stop()
    assert code == 0
    sent = {base64.b64decode(b["messages"][0]["content"][1]["image_url"]["url"].split(",")[1])
            for b in seen}
    assert sent == pngs
    # prompts cycle through the file; its max_tokens wins over --max-tokens
    assert sorted((b["messages"][0]["content"][0]["text"], b["max_tokens"]) for b in seen) == \
        [("a", 3), ("a", 3), ("b", 2), ("b", 2)]
    (row,) = check_results(tmp_path / "out", "--images")["rows"]
    assert (row["ok"], row["out_tokens"]) == (4, 10), row


@pytest.mark.parametrize("flags, says", [
    (["--slo", "ttft=fast"], "--slo"),
    (["--slo", "latency=1"], "--slo"),
    (["--max-tokens", "uniform:9-3"], "--max-tokens"),
    (["--max-tokens", "lots"], "--max-tokens"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "2", "--request-rate", "1"], "not both"),
    (["--image-sizes", "640"], "--image-sizes"),
    (["--images", "."], "--images"),
])
def test_bad_flags_get_a_clear_error(flags, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # "." holds no image
    code = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert not (tmp_path / "bench-results").exists()
