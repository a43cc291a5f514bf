"""The official openai package against `fastllava serve` (/v1/chat/completions, /v1/models).

Every answer is checked against the engine itself, loaded in the test process from the same
checkpoint: for temperature 0 (or a fixed seed) the text must be identical, usage must count the
engine's prompt ids (image tokens included) and generated ids, and finish_reason must say why the
engine stopped.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from fastllava import LLaVA
from fastllava.schema import parse_request
from fastllava.text.template import BUILTIN_TEMPLATES

MODEL = "fal-ai/llavav15-13b"


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def client(lenient_server):
    with openai.OpenAI(base_url=lenient_server.url + "/v1", api_key="unused",
                       max_retries=0, timeout=60) as c:
        yield c


def user(image: str, text: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image}}]}]


def expected(llava, image: str, prompt: str, max_tokens: int, **kw) -> dict:
    """What the engine itself produces for the same request."""
    request = {"image_url": image, "prompt": prompt, "max_tokens": max_tokens,
               "temperature": 0, **kw}
    ids = llava.generate_ids(request)
    prompt_ids = llava.prepare(parse_request(request)).input_ids
    return {"text": llava.generate(request)["output"], "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(ids),
            "finish_reason": "stop" if ids[-1] in llava.stop_ids else "length"}


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL], ids


def test_chat_with_data_uri_matches_engine(client, llava, data_uri):
    want = expected(llava, data_uri, "What is in the image?", 12)
    r = client.chat.completions.create(model=MODEL, messages=user(data_uri), max_tokens=12,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"], (choice.message.content, want["text"])
    assert choice.finish_reason == want["finish_reason"], (choice.finish_reason, want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        want["prompt_tokens"], want["completion_tokens"]), (r.usage, want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_stream_with_loopback_url_and_usage(client, llava, image_host, data_uri):
    url = image_host.url + "/img.png"   # the same PNG bytes as data_uri
    want = expected(llava, data_uri, "Describe it.", 10)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user(url, "Describe it."), max_completion_tokens=10, max_tokens=3,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    assert text == want["text"], (text, want["text"])   # max_completion_tokens won over max_tokens
    reasons = [c.choices[0].finish_reason for c in choice_chunks]
    assert reasons[-1] == want["finish_reason"] and not any(reasons[:-1]), reasons
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None, chunks[-1]
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        want["prompt_tokens"], want["completion_tokens"]), (usage, want)


def test_raw_stream_ends_with_done(lenient_server, data_uri):
    body = {"model": MODEL, "messages": user(data_uri), "max_tokens": 4, "stream": True}
    with httpx.Client(base_url=lenient_server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    lines = [ln for ln in r.text.splitlines() if ln]
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1, lines[-3:]
    assert all(ln.startswith("data: ") for ln in lines), lines


def test_stop_string(client, llava, data_uri):
    full = expected(llava, data_uri, "What is in the image?", 12)["text"]
    stop = full[3:5]
    assert len(full) > 5 and full.find(stop) >= 0, full
    cut = full[:full.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=user(data_uri), max_tokens=12,
                                       temperature=0, stop=[stop, "never-seen-xyz"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop", (
        r.choices[0], cut)
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(data_uri),
                                                 max_tokens=12, temperature=0, stop=stop,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cut, (text, cut)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_system_and_multi_turn_match_engine_chat(client, llava, data_uri):
    messages = [{"role": "system", "content": "Answer briefly."}, *user(data_uri, "What is it?"),
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": "And the colors?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                       temperature=0)
    engine_messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colors?"}]}]
    request = {"image_url": data_uri, "prompt": "x", "max_tokens": 8, "temperature": 0}
    *_, last = llava.stream_detailed(request, messages=engine_messages)
    assert r.choices[0].message.content == last["output"], (r.choices[0].message.content, last)
    assert r.usage.prompt_tokens == last["prompt_tokens"], (r.usage, last)
    rendered = llava.render_chat(engine_messages)
    assert "Answer briefly." in rendered and "A picture." in rendered, rendered


def test_system_text_folded_when_the_template_drops_it(llava):
    """The mistral template ignores system messages: render_chat folds the text into the
    first user turn instead of losing it."""
    saved = llava.template
    llava.template = BUILTIN_TEMPLATES["mistral"]
    try:
        rendered = llava.render_chat([
            {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    finally:
        llava.template = saved
    assert rendered == "[INST] <image>\nBe terse.\n\nHi? [/INST]", repr(rendered)


def test_seeded_sampling_matches_engine(client, llava, data_uri):
    request = {"image_url": data_uri, "prompt": "What is in the image?", "max_tokens": 8,
               "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    want = llava.generate(request)["output"]
    got = [client.chat.completions.create(model=MODEL, messages=user(data_uri), max_tokens=8,
                                          temperature=0.9, top_p=0.95, seed=1234)
           .choices[0].message.content for _ in range(2)]
    assert got == [want, want], (got, want)


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "IMG"}}] * 5}]}, 400, "at most 4 images"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "IMG"}}]}]}, 400, "only accepted in user"),
    ({"n": 17}, 400, "n must be an integer between 1 and 16"),
    ({"model": "gpt-4o"}, 404, "does not exist"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ({"top_logprobs": 3}, 400, "logprobs"),
])
def test_client_errors_have_openai_shape(client, data_uri, kwargs, status, needle):
    body = {"model": MODEL, "messages": user(data_uri), "max_tokens": 4, **kwargs}
    body["messages"] = [dict(m, content=[dict(p, image_url={"url": data_uri})
                                         if p.get("type") == "image_url" else p
                                         for p in m["content"]])
                        if isinstance(m["content"], list) else m for m in body["messages"]]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    err = info.value
    assert err.status_code == status, (err.status_code, err.body)
    assert set(err.body) >= {"message", "type", "param", "code"}, err.body  # the "error" object
    assert needle in err.body["message"], err.body
