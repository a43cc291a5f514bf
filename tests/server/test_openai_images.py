"""The official openai client against `fastllava serve` beyond one image: several images in one
chat (each where its part stands, anyres per image on LLaVA-NeXT), text-only chats, and the
per-request image limit (--max-images-per-request). Every answer is compared with the engine
itself, loaded in the test process from the same checkpoint, given the same chat.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import numpy as np
import openai
import pytest
from PIL import Image

from fastllava import LLaVA

MODEL = "fal-ai/llava-next"
LIMIT = 3


def _data_uri(h: int, w: int, seed: int) -> str:
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def llava(tiny_next):
    return LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(server_factory, tiny_next):
    return server_factory(tiny_next, "--max-images-per-request", str(LIMIT))


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _engine(llava, messages, max_tokens: int) -> dict:
    *_, last = llava.stream_detailed({"max_tokens": max_tokens, "temperature": 0},
                                     messages=messages)
    return last


def test_two_images_match_engine(client, llava):
    a, b = _data_uri(75, 100, 1), _data_uri(160, 40, 2)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "First:"}, _image_part(a),
        {"type": "text", "text": "second:"}, _image_part(b), {"type": "text", "text": "Compare."}]}]
    want = _engine(llava, messages, 10)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.choices[0].message.content == want["output"], (r.choices[0], want)
    assert r.usage.prompt_tokens == want["prompt_tokens"], (r.usage, want)
    # The order of the parts matters: swapped images are a different prompt.
    swapped = [{"role": "user", "content": [
        {"type": "text", "text": "First:"}, _image_part(b),
        {"type": "text", "text": "second:"}, _image_part(a), {"type": "text", "text": "Compare."}]}]
    assert _engine(llava, swapped, 10)["output"] == client.chat.completions.create(
        model=MODEL, messages=swapped, max_tokens=10, temperature=0).choices[0].message.content


def test_text_only_chat_matches_engine_and_streams(client, llava):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story."}]
    want = _engine(llava, messages, 8)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.content == want["output"]
    assert r.usage.prompt_tokens == want["prompt_tokens"] == len(
        llava.prepare(llava._parse({}, llava_messages(messages)),
                      messages=llava_messages(messages)).input_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["output"]


def llava_messages(messages):
    from fastllava.messages import chat_messages

    return chat_messages(messages)


def test_more_images_than_the_limit_is_a_400(client):
    img = _data_uri(40, 40, 3)
    messages = [{"role": "user", "content": [_image_part(img)] * (LIMIT + 1)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert f"at most {LIMIT} images" in info.value.body["message"], info.value.body
    assert "--max-images-per-request" in info.value.body["message"]
    assert info.value.body["param"] == "messages"
    # At the limit it is served.
    r = client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": [_image_part(img)] *
                                                  LIMIT}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_bad_second_image_names_the_problem(client):
    messages = [{"role": "user", "content": [_image_part(_data_uri(40, 40, 3)),
                                             _image_part("data:image/png;base64,AAAA")]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert info.value.body["param"] == "messages", info.value.body


def _image_chat(text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [_image_part(_data_uri(75, 100, 1)),
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_match_engine(client, llava, stream):
    messages = _image_chat()
    *_, want = llava.stream_detailed({"max_tokens": 8, "temperature": 0.8, "seed": 5},
                                     messages=messages, logprobs=3)
    kwargs = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0.8, seed=5,
                  logprobs=True, top_logprobs=3)
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        content = [e for c in chunks if c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, text = choice.logprobs.content, choice.message.content
    assert text == want["output"]
    assert [(e.token, e.logprob, e.bytes) for e in content] == [
        (w["token"], w["logprob"], w["bytes"]) for w in want["logprobs"]]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in content] == [
        [(t["token"], t["logprob"]) for t in w["top_logprobs"]] for w in want["logprobs"]]
    assert all(len(e.top_logprobs) == 3 for e in content)


def test_no_logprobs_unless_asked_and_bad_values(client):
    r = client.chat.completions.create(model=MODEL, messages=_image_chat(), max_tokens=3)
    assert r.choices[0].logprobs is None
    for kwargs, needle in (({"top_logprobs": 2}, "needs logprobs"),
                           ({"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
                           ({"logprobs": "yes"}, "boolean")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=_image_chat(), max_tokens=3,
                                           **kwargs)
        assert needle in info.value.body["message"], info.value.body


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_share_the_prefill_and_match_engine(client, llava, stream):
    """n seeded samples: choice 0 is the request's own seed, the others derived seeds, each the
    engine's own output for that seed; the prompt is counted once in usage."""
    from fastllava.evaluation import choice_seeds

    messages, n = _image_chat("Tell me more."), 3
    seeds = choice_seeds(11, n)
    want = [_engine_sampled(llava, messages, seed) for seed in seeds]
    assert len({w["output"] for w in want}) > 1, want   # the derived seeds really differ
    kwargs = dict(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=11, n=n)
    if stream:
        chunks = list(client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs))
        texts, reasons = [""] * n, [None] * n
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
                reasons[ch.index] = ch.finish_reason or reasons[ch.index]
        got_usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kwargs)
        assert [c.index for c in r.choices] == list(range(n))
        texts = [c.message.content for c in r.choices]
        reasons = [c.finish_reason for c in r.choices]
        got_usage = r.usage
    assert texts == [w["output"] for w in want]
    assert reasons == [w["finish_reason"] for w in want]
    assert got_usage.prompt_tokens == want[0]["prompt_tokens"]
    assert got_usage.completion_tokens == sum(w["completion_tokens"] for w in want)


def _engine_sampled(llava, messages, seed: int) -> dict:
    *_, last = llava.stream_detailed({"max_tokens": 8, "temperature": 1.0, "seed": seed},
                                     messages=messages)
    return last


def _metrics(http) -> dict[str, float]:
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in http.get("/metrics").text
                                     .splitlines() if line and not line.startswith("#"))}


def _wait_for(cond, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_every_choice(server, stream):
    """A client that goes away mid-answer stops all n choices: pages freed, none left running."""
    body = {"model": MODEL, "n": 3, "max_tokens": 3000, "temperature": 1.0, "stream": stream,
            "messages": _image_chat()}
    payload = json.dumps(body).encode()
    with server.client() as http:
        before = _metrics(http)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode() + payload)
        _wait_for(lambda: _metrics(http)["fastllava_running"] >= 3, 30)
        sock.close()
        _wait_for(lambda: (m := _metrics(http))["fastllava_running"] == 0
                  and m["fastllava_kv_pages_used"] == 0, 10)
        after = _metrics(http)
    assert after["fastllava_cancelled_total"] == before["fastllava_cancelled_total"] + 3
    done = after["fastllava_completion_tokens_total"] - before["fastllava_completion_tokens_total"]
    assert done < 3 * 3000 * 0.75, done
