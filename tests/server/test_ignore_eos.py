"""`ignore_eos` on /v1/chat/completions (vLLM's and SGLang's extension; their benchmark clients
send it for fixed-length outputs): the checkpoint's stop ids do not end any choice, which runs
to max_tokens. The app runs in-process on the real engine, whose stop id is made the first token
this prompt generates (as if it were its eos), so stopping early is certain without ignore_eos."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fastllava import LLaVA
from fastllava.server.app import create_app
from fastllava.server.settings import ServerSettings

MODEL = "me/llava"


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32")


def post_chats(llava, bodies: list[dict]) -> list[httpx.Response]:
    app = create_app(ServerSettings(model="unused", endpoint_id=MODEL), llava, run_worker=False)

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", timeout=120) as c:
            return [await c.post("/v1/chat/completions", json=b) for b in bodies]
    return asyncio.run(calls())


def test_ignore_eos_runs_every_choice_to_max_tokens(llava, data_uri, monkeypatch):
    text = "What is in the image?"
    first = llava.generate_ids({"image_url": data_uri, "prompt": text, "max_tokens": 1,
                                "temperature": 0})[0]
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image_url", "image_url": {"url": data_uri}}]}]}
    monkeypatch.setattr(llava, "stop_ids", ())
    (free,) = post_chats(llava, [body])
    monkeypatch.setattr(llava, "stop_ids", (first,))
    stopped, ignored, choices, off, bad = post_chats(llava, [
        body, dict(body, ignore_eos=True), dict(body, ignore_eos=True, n=2),
        dict(body, ignore_eos=False), dict(body, ignore_eos="yes")])
    want = free.json()["choices"][0]["message"]["content"]
    for r in (free, stopped, ignored, choices, off):
        assert r.status_code == 200, r.text
    for r in (stopped, off):
        assert r.json()["choices"][0]["finish_reason"] == "stop", r.json()
        assert r.json()["usage"]["completion_tokens"] == 1, r.json()
    for r, n in ((ignored, 1), (choices, 2)):
        got = r.json()
        assert got["usage"]["completion_tokens"] == 6 * n, got
        assert [c["finish_reason"] for c in got["choices"]] == ["length"] * n, got
        assert [c["message"]["content"] for c in got["choices"]] == [want] * n, got
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ignore_eos", bad.text
