"""A prompt + max_tokens over the context is refused on every route, never cut short; the OpenAI
route's own default max_tokens (the client set none) shrinks to fit instead, as vLLM does.

One real server on loopback with --max-context 300: the tiny LLaVA-1.5 prompt (16 image tokens
plus the template, under 100 tokens) fits with room for a couple of hundred tokens, fewer than
the OpenAI default of 512, and max_tokens 1000 does not fit.
"""

from __future__ import annotations

import re
import time

import pytest

EP = "fal-ai/llavav15-13b"
MAX_CONTEXT = 300


@pytest.fixture(scope="module")
def client(server_factory, tiny_llava):
    server = server_factory(tiny_llava, "--max-context", str(MAX_CONTEXT))
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def req(data_uri):
    return {"image_url": data_uri, "prompt": "What is in the image?", "temperature": 0,
            "max_tokens": 1000}


def _named(message: str) -> int:
    """Checks the message names the prompt tokens, max_tokens and max_context; returns the
    prompt token count it gives."""
    found = re.search(r"prompt tokens \((\d+), image included\) \+ max_tokens \(1000\) = (\d+) "
                      rf"exceeds max_context \({MAX_CONTEXT}\)", message)
    assert found, message
    prompt = int(found.group(1))
    assert int(found.group(2)) == prompt + 1000 and f"at most {MAX_CONTEXT - prompt}" in message
    return prompt


def _fal_detail(body: dict) -> dict:
    (item,) = body["detail"]
    assert item["loc"] == ["body", "max_tokens"] and item["type"] == "context_length_exceeded", body
    _named(item["msg"])
    return item


def test_fal_run_and_queue_refuse_with_422(client, req):
    r = client.post(f"/{EP}", json=req)
    assert r.status_code == 422, r.text
    _fal_detail(r.json())

    job = client.post(f"/queue/{EP}", json=req).json()
    deadline = time.monotonic() + 60
    while client.get(job["status_url"]).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline, "queued job never completed"
        time.sleep(0.1)
    r = client.get(job["response_url"])
    assert r.status_code == 422, r.text
    _fal_detail(r.json())


def _chat(data_uri: str, **extra) -> dict:
    return {"model": EP, "temperature": 0, **extra, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": data_uri}}]}]}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_openai_refuses_a_max_tokens_the_client_chose(client, data_uri, field):
    r = client.post("/v1/chat/completions", json=_chat(data_uri, **{field: 1000}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error     # the field the client set, not the engine's name
    # OpenAI's own code for this: clients test it to trim the conversation and retry.
    assert error["code"] == "context_length_exceeded", error
    _named(error["message"])


@pytest.mark.parametrize("stream", [False, True])
def test_openai_prompt_alone_over_the_context_is_context_length_exceeded(client, data_uri,
                                                                          stream):
    body = {**_chat(data_uri, stream=stream),
            "messages": [{"role": "user", "content": "the cat " * MAX_CONTEXT}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded", error
    assert "the prompt alone fills the context" in error["message"], error


def test_openai_default_max_tokens_shrinks_to_fit(client, data_uri):
    """No max_tokens: the server default (512) is over the room left, so it is lowered to it."""
    r = client.post("/v1/chat/completions", json=_chat(data_uri))
    assert r.status_code == 200, r.text
    body = r.json()
    usage, finish = body["usage"], body["choices"][0]["finish_reason"]
    assert MAX_CONTEXT - usage["prompt_tokens"] < 512, f"test setup: the default fits ({usage})"
    assert usage["total_tokens"] <= MAX_CONTEXT, usage
    assert finish == "stop" or usage["total_tokens"] == MAX_CONTEXT, (finish, usage)
