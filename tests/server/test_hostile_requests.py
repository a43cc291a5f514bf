"""Property test: no request, however malformed, gets a 5xx or a dropped connection, on any route.

Hypothesis drives every route of the real server (strict_server: TLS, API keys, small limits) over
loopback with generated bodies (JSON of every type, lone surrogates as escapes and as raw bytes,
deep nesting, huge integers, invalid UTF-8, arbitrary bytes, valid requests with one hostile
field), request-id path segments of arbitrary percent-encoded bytes, query strings, headers and
x-fal-target-url values; each answer must pass rawhttp.check_clean_answer (no 5xx, a request id
header, an error body of the route's protocol shape, strict UTF-8 JSON).

By default 80 examples per route family, the same ones every run (derandomized; no example
database is written). FASTLLAVA_FUZZ_EXAMPLES=n runs n per family, new ones each run, to search
further.
"""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import quote, unquote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawhttp import check_clean_answer, raw_request
from serverkit import API_KEY, make_png

EP = "fal-ai/llavav15-13b"
PNG_URI = "data:image/png;base64," + base64.b64encode(make_png(8, 8)).decode()
_EXAMPLES = os.environ.get("FASTLLAVA_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 80), deadline=None, database=None,
                derandomize=_EXAMPLES is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies --------------------------------------------------------------------------------
# Any code point, lone surrogates included (st.text excludes category Cs by default).
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats() | any_text | st.sampled_from(["", " ", "4", "\x00", "\ud800", "\udfff"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)


@st.composite
def encoded(draw, values) -> bytes:
    """A JSON value as bytes: \\uXXXX escapes, or raw UTF-8 with surrogates as CESU bytes."""
    value = draw(values)
    if draw(st.booleans()):
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def pathological() -> st.SearchStrategy[bytes]:
    depth = st.sampled_from([65, 1_000, 100_000])
    return st.one_of(
        depth.map(lambda n: b"[" * n + b"]" * n),
        depth.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        depth.map(lambda n: b"[" * n),                              # unterminated
        st.sampled_from([4301, 100_000]).map(lambda n: b'{"max_tokens": ' + b"9" * n + b"}"),
        st.sampled_from([b'{"prompt": "\\ud800"}', b'{"\\udc00": 1}', b'"\xed\xa0\x80"',
                         b'{"prompt": "\xff"}', b"\xef\xbb\xbf{}", b"", b" ", b"null", b"NaN",
                         b'{"a": 1e999999}', b'{"a": -Infinity}', b"\x00\x00\x00{"]),
        st.binary(max_size=64))


def _mutate(base: dict, keys: list[str]) -> st.SearchStrategy[dict]:
    """`base` with one field replaced by (or one extra field set to) a hostile value."""
    return st.builds(lambda k, v: {**base, k: v}, st.sampled_from(keys) | any_text, json_values)


FAL_BASE = {"image_url": PNG_URI, "prompt": "hi", "max_tokens": 2, "temperature": 0}
IMAGE_URLS = st.sampled_from([PNG_URI, PNG_URI[:40], "data:image/png;base64,@@", "data:,",
                              "http://127.0.0.1/x.png", "http://[::127.0.0.1]/", "file:///etc/x",
                              "http://[::1", "http://a\x00b/", "\ud800", "/etc/hostname"])
fal_bodies = st.one_of(encoded(json_values), pathological(),
                       encoded(_mutate(FAL_BASE, list(FAL_BASE) + ["seed", "top_p",
                                                                   "max_new_tokens"])),
                       encoded(st.builds(lambda u: {**FAL_BASE, "image_url": u}, IMAGE_URLS)))


def _chat(text="hi", url=PNG_URI, role="user", **extra) -> dict:
    return {"model": EP, "max_tokens": 2, "messages": [{"role": role, "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}],
        **extra}


CHAT_KEYS = ["model", "messages", "max_tokens", "max_completion_tokens", "stop", "n", "stream",
             "stream_options", "temperature", "top_p", "seed", "logprobs", "tools",
             "response_format", "user"]
chat_bodies = st.one_of(
    encoded(json_values), pathological(), encoded(_mutate(_chat(), CHAT_KEYS)),
    encoded(st.builds(_chat, any_text, IMAGE_URLS, json_values)),
    encoded(st.builds(lambda part: {**_chat(), "messages": [{"role": "user", "content": [part]}]},
                      json_values)))

# Path segments: arbitrary bytes percent-encoded (%00, %FF, %ED%A0%80, ...) or left as text.
segments = st.one_of(st.binary(min_size=1, max_size=12).map(lambda b: quote(b, safe="")),
                     st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                           exclude_characters="/?#%"), min_size=1, max_size=12),
                     st.sampled_from(["%00", "%FF", "%ED%A0%80", "..", "%2F", "a%20b"]))
queries = st.one_of(st.just(""), st.binary(max_size=24).map(lambda b: "?" + quote(b, safe="=&")),
                    st.sampled_from(["?logs=1", "?fal_webhook=ftp://x", "?fal_webhook=%FF",
                                     "?fal_webhook=http://%00", "?logs=%ED%A0%80", "?%00=%00"]))
# Header values a server must accept (RFC 9110 field-value: VCHAR, obs-text, SP, HTAB).
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                      exclude_characters="\x7f"), max_size=40).map(str.strip)
AUTH = ("Authorization", f"Key {API_KEY}")
extra_headers = st.lists(st.tuples(
    st.sampled_from(["Idempotency-Key", "x-idempotency-key", "Content-Type", "Accept",
                     "Host", "X-Forwarded-Proto", "Authorization"]), header_values),
    max_size=2, unique_by=lambda h: h[0].lower())


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _send(server, method, target, body, headers, openai: bool) -> None:
    r = raw_request(server, method, target, body, [AUTH, *headers])
    check_clean_answer(r, openai=openai, what=f"{method} {target[:120]!r} body {body[:120]!r} "
                                              f"headers {headers!r}")


# ---- the properties ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def done_id(strict_server):
    """A completed job, so the status/result/cancel routes also answer for a real id."""
    with strict_server.client(headers={"Authorization": f"Key {API_KEY}"}) as c:
        job = c.post(f"/queue/{EP}", json=FAL_BASE).json()
        c.get(job["status_url"] + "/stream")   # the status stream ends when the job completes
    return job["request_id"]


@FUZZ
@given(route=st.sampled_from([f"/queue/{EP}", f"/{EP}", f"/{EP}/stream", f"/queue/{EP}/a/b",
                              f"/{EP}/sub"]),
       body=fal_bodies, query=queries, headers=extra_headers)
def test_fal_submit_and_run_routes(strict_server, route, body, query, headers):
    _send(strict_server, "POST", route + query, body, headers, openai=False)


@FUZZ
@given(body=chat_bodies, query=queries, headers=extra_headers)
def test_openai_chat_route(strict_server, body, query, headers):
    _send(strict_server, "POST", "/v1/chat/completions" + query, body, headers, openai=True)


@FUZZ
@given(prefix=st.sampled_from(["", "/queue"]), owner=st.sampled_from([EP, "fal-ai/other"]),
       request_id=segments | st.just("{real}"),
       tail=st.sampled_from([("GET", "/status"), ("GET", "/status/"), ("GET", "/status/stream"),
                             ("GET", ""), ("GET", "/response"), ("PUT", "/cancel")]),
       query=queries, body=st.just(b"") | pathological(), headers=extra_headers)
def test_request_id_routes(strict_server, done_id, prefix, owner, request_id, tail, query, body,
                           headers):
    method, suffix = tail
    target = f"{prefix}/{owner}/requests/{request_id.replace('{real}', done_id)}{suffix}{query}"
    _send(strict_server, method, target, body, headers, openai=False)


target_urls = st.one_of(
    header_values,
    st.builds(lambda host, path, q: f"https://{host}/{path}{q}",
              st.sampled_from(["queue.fal.run", "fal.run", "[::1", "[x]", "a:99999", "h:p"]),
              st.sampled_from([EP, f"{EP}/stream", f"{EP}/requests/%FF/status", "v1/models",
                               "v1/chat/completions", "health", "%00", "v1/%ED%A0%80"]) | segments,
              queries))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT"]), target=target_urls,
       body=st.one_of(fal_bodies, chat_bodies), authorized=st.booleans())
def test_js_proxy_route(strict_server, method, target, body, authorized):
    headers = [("x-fal-target-url", target)]
    r = raw_request(strict_server, method, "/api/fal/proxy", body,
                    [AUTH, *headers] if authorized else headers)
    try:  # the path the server routes by (README: the JS proxy mode)
        parts = urlsplit(target)
        path = unquote(parts.path if parts.path.startswith("/") else "/" + parts.path)
        path = ("/queue" if (parts.hostname or "").startswith("queue.") else "") + path
    except ValueError:  # a malformed target: answered under the proxy's own path
        path = "/api/fal/proxy"
    check_clean_answer(r, openai=_is_openai(path), what=f"{method} proxy → {target!r}")
    if not authorized:
        assert r.status == 401 or path == "/health", (target, r.status, r.body)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]),
       path=st.sampled_from(["/health", "/metrics", "/v1/models", "/v1/", "/v1/nothing", "/"])
       | segments.map(lambda s: "/" + s) | segments.map(lambda s: "/v1/" + s),
       query=queries, body=st.just(b"") | pathological(), headers=extra_headers)
def test_other_routes(strict_server, method, path, query, body, headers):
    _send(strict_server, method, path + query, body, headers,
          openai=_is_openai(unquote(path, errors="replace")))
