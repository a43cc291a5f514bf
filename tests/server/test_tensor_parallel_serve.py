"""`fastllava serve --tensor-parallel-size 2` through the real server: the fal and OpenAI routes
answer what the in-process TP=1 model answers (greedy), and stopping the server leaves no worker
process behind."""

from __future__ import annotations

import time
from pathlib import Path

from fastllava import LLaVA
from test_fp8_serve import _image
from test_server_logs import startup_block

EP = "fal-ai/llava-next"


def _children(pid: int) -> list[int]:
    """pids whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_serve_tensor_parallel_matches_tp1(server_factory, tiny_next):
    server = server_factory(tiny_next, "--tensor-parallel-size", "2", "--log-level", "info")
    fields = startup_block(server.log_text())
    assert fields["device"] == "cpu + 1 tensor-parallel worker rank(s)", fields
    assert fields["CUDA graphs"] == "off (CUDA + triton backend only)", fields
    workers = _children(server.proc.pid)
    assert len(workers) == 1, f"expected one worker process, found {workers}"
    req = {"image_url": _image(), "prompt": "what is in this image", "max_tokens": 12,
           "temperature": 0}
    chat = {"model": EP, "max_tokens": 12, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": req["image_url"]}},
                                     {"type": "text", "text": req["prompt"]}]}]}
    with server.client() as client:
        r = client.post(f"/{EP}", json=req)
        c = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert c.status_code == 200, c.text
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")
    try:
        expected = llava.generate(req)["output"]
    finally:
        llava.close()
    assert r.json()["output"] == expected, (r.json(), expected)
    assert c.json()["choices"][0]["message"]["content"] == expected, c.json()

    server.stop()
    assert server.proc.returncode is not None
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), f"worker {workers} outlived the server"
