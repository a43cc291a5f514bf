"""Each malformed request found by the hostile trial (issue 10, item 1) is a clean 4xx naming the
problem, over HTTP against the real strict_server (TLS, API keys), on every route it can reach.
The property test over all routes is test_hostile_requests.py.
"""

from __future__ import annotations

import json

import pytest

from rawhttp import check_clean_answer, raw_request
from serverkit import API_KEY

EP = "fal-ai/llavav15-13b"
AUTH = [("Authorization", f"Key {API_KEY}")]
FAL_BODY_ROUTES = [f"/queue/{EP}", f"/{EP}", f"/{EP}/stream", f"/queue/{EP}/sub/path"]
ID_ROUTES = [("GET", "/{ep}/requests/{id}/status"), ("GET", "/queue/{ep}/requests/{id}/status/"),
             ("GET", "/{ep}/requests/{id}/status/stream"), ("GET", "/queue/{ep}/requests/{id}"),
             ("GET", "/{ep}/requests/{id}/response"), ("PUT", "/queue/{ep}/requests/{id}/cancel"),
             ("PUT", "/{ep}/requests/{id}/cancel")]


def post(server, path, body: bytes, headers=()):
    r = raw_request(server, "POST", path, body, [*AUTH, *headers])
    check_clean_answer(r, openai=path.startswith("/v1/"), what=f"POST {path}")
    return r


def fal_detail(r, status=422) -> list:
    assert r.status == status, (r.status, r.body[:300])
    return r.json()["detail"]


def openai_message(r) -> dict:
    assert r.status == 400, (r.status, r.body[:300])
    return r.json()["error"]


@pytest.fixture(scope="module")
def png_request(data_uri):
    return {"image_url": data_uri, "prompt": "What is it?", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("opening, closing, depth", [(b"[", b"]", 100_000),
                                                     (b'{"a":', b"}", 40_000)])
def test_deeply_nested_json(strict_server, opening, closing, depth):
    deep = opening * depth + b"0" + closing * depth    # within --max-body-bytes 300000
    for path in FAL_BODY_ROUTES:
        detail = fal_detail(post(strict_server, path, deep))
        assert detail[0]["type"] == "json_invalid" and "nested deeper than 64" in detail[0]["msg"]
    assert "nested deeper" in openai_message(post(strict_server, "/v1/chat/completions",
                                                  deep))["message"]
    proxied = post(strict_server, "/api/fal/proxy", deep,
                   [("x-fal-target-url", f"https://queue.fal.run/{EP}")])
    assert fal_detail(proxied)[0]["type"] == "json_invalid"


def test_nesting_limit_is_exactly_64_levels(strict_server):
    def nested(depth: int) -> bytes:
        return b"[" * depth + b"]" * depth

    assert fal_detail(post(strict_server, f"/{EP}", nested(64)))[0]["type"] == "model_type"
    assert fal_detail(post(strict_server, f"/{EP}", nested(65)))[0]["type"] == "json_invalid"


@pytest.mark.parametrize("encoding", ["escape", "raw bytes"])
def test_lone_surrogate_in_the_prompt(strict_server, png_request, encoding):
    body = dict(png_request, prompt="describe \ud800 this")
    raw = json.dumps(body).encode() if encoding == "escape" else \
        json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    for path in FAL_BODY_ROUTES:   # the queue refuses it too: no job that completes as a 500
        detail = fal_detail(post(strict_server, path, raw))
        assert [(d["loc"], d["type"]) for d in detail] == [(["body", "prompt"],
                                                            "string_unicode")], detail
        assert "index 9" in detail[0]["msg"], detail
    chat = {"model": EP, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a\udfffb"},
        {"type": "image_url", "image_url": {"url": png_request["image_url"]}}]}]}
    error = openai_message(post(strict_server, "/v1/chat/completions", json.dumps(chat).encode()))
    assert error["param"] == "messages[0].content[0].text" and "surrogate" in error["message"]


def test_lone_surrogate_as_a_field_name_is_reported_and_escaped(strict_server, png_request):
    raw = json.dumps({**png_request, "\ud800x": 1, "max_tokens": 0}).encode()
    for path in FAL_BODY_ROUTES:
        detail = fal_detail(post(strict_server, path, raw))
        assert [(d["loc"], d["type"]) for d in detail] == [(["body", "\\ud800x"],
                                                            "string_unicode")], detail
    error = openai_message(post(strict_server, "/v1/chat/completions",
                                json.dumps({"model": EP, "\udc00": []}).encode()))
    assert error["param"] == "\\udc00", error


def test_integer_past_the_digit_limit(strict_server, png_request):
    raw = json.dumps(png_request).replace('"max_tokens": 2', '"max_tokens": ' + "9" * 100_000)
    for path in FAL_BODY_ROUTES:
        detail = fal_detail(post(strict_server, path, raw.encode()))
        assert detail[0]["type"] == "json_invalid" and "digits" in detail[0]["ctx"]["error"]
    assert "digits" in openai_message(post(strict_server, "/v1/chat/completions",
                                           raw.encode()))["message"]


@pytest.mark.parametrize("bad_id", ["%FF", "%ED%A0%80", "%00", "a%00b", "x%20y", "%E2%82%AC",
                                    "a" * 129])
def test_malformed_request_ids(strict_server, bad_id):
    """A 404 like any unknown id (cancel: status NOT_FOUND), saying why; the id is neither looked
    up nor echoed in x-fal-request-id (where %00 dropped the connection and non-Latin-1 text was
    a 500)."""
    for method, route in ID_ROUTES:
        target = route.format(ep=EP, id=bad_id)
        r = raw_request(strict_server, method, target, headers=AUTH)
        check_clean_answer(r, openai=False, what=f"{method} {target}")
        assert r.status == 404 and r.json()["error_type"] == "not_found", (target, r.body)
        assert "not a request id" in r.json()["detail"], (target, r.body)
        assert method == "GET" or r.json()["status"] == "NOT_FOUND", r.body
        assert len(r.headers["x-fal-request-id"]) == 32, "the id must not be echoed"
    # the JS proxy form of the same request
    r = raw_request(strict_server, "GET", "/api/fal/proxy", headers=[*AUTH, (
        "x-fal-target-url", f"https://queue.fal.run/{EP}/requests/{bad_id}/status")])
    assert r.status == 404 and "not a request id" in r.json()["detail"], r.body


@pytest.mark.parametrize("target", ["http://[::1", "https://[fal.run/x", "http://[x]/y",
                                    "http://a]/"])
def test_malformed_proxy_target_after_auth(strict_server, target):
    for method in ("GET", "POST"):
        anonymous = raw_request(strict_server, method, "/api/fal/proxy", b"{}",
                                [("x-fal-target-url", target)])
        check_clean_answer(anonymous, openai=False, what=target)
        assert anonymous.status == 401, "auth is checked before the target is parsed"
        r = raw_request(strict_server, method, "/api/fal/proxy", b"{}",
                        [*AUTH, ("x-fal-target-url", target)])
        check_clean_answer(r, openai=False, what=target)
        assert r.status == 400 and r.json()["error_type"] == "bad_request", r.body
        assert "x-fal-target-url" in r.json()["detail"], r.body


def test_proxy_target_with_non_ascii_bytes(strict_server):
    for target in ("?\x80", "https://fal.run/\xff\xfe/x?q=\xe9", "https://queue.fal.run/\x80"):
        r = raw_request(strict_server, "GET", "/api/fal/proxy",
                        headers=[*AUTH, ("x-fal-target-url", target)])
        check_clean_answer(r, openai=False, what=repr(target))
        assert r.status == 404, (target, r.status, r.body)


@pytest.mark.parametrize("webhook", ["ftp://x", "http://", "http://[::1", "http://a:99999/",
                                     "http://a b/", "https://a\x00b/", "http://%00/",
                                     "http://a..b/", "https://-x.example/", "http://a%20b/"])
def test_malformed_webhook_url(strict_server, png_request, webhook):
    from urllib.parse import quote

    r = post(strict_server, f"/queue/{EP}?fal_webhook={quote(webhook, safe='')}",
             json.dumps(png_request).encode())
    assert fal_detail(r)[0]["loc"] == ["query", "fal_webhook"], r.body


def test_image_url_problem_listed_with_the_other_fields(strict_server):
    """README: a 422 lists all problems at once; the image_url policy check was left out while
    other fields were also wrong (issue 11.6)."""
    body = json.dumps({"image_url": "http://127.0.0.1/x.png", "prompt": " ", "max_tokens": 0,
                       "colour": "red"}).encode()
    for path in FAL_BODY_ROUTES:
        detail = fal_detail(post(strict_server, path, body))
        assert [(d["loc"][1], d["type"]) for d in detail] == [
            ("colour", "extra_forbidden"), ("image_url", "image_url_refused"),
            ("prompt", "string_too_short"), ("max_tokens", "greater_than_equal")], detail
    chat = {"model": EP, "max_tokens": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}
    message = openai_message(post(strict_server, "/v1/chat/completions",
                                  json.dumps(chat).encode()))["message"]
    assert "image_url: must be an http(s)" in message and "max_tokens: must be" in message


def test_bodies_of_very_many_values_are_refused_before_parsing(strict_server, png_request):
    """json.loads holds the GIL for the whole parse, so a worker thread can't keep the loop free:
    a body of millions of tiny values is refused by counting its separators first."""
    many = b"[" + b"0," * 120_000 + b"0]"                  # 240 kB, within --max-body-bytes
    for path in FAL_BODY_ROUTES:
        detail = fal_detail(post(strict_server, path, many))
        assert detail[0]["type"] == "json_invalid" and "separators" in detail[0]["ctx"]["error"]
    assert "separators" in openai_message(post(strict_server, "/v1/chat/completions",
                                               many))["message"]
    # A prompt full of commas and colons is still an ordinary request.
    busy = dict(png_request, prompt=",:" * 900)          # under --max-prompt-chars 2000
    r = post(strict_server, f"/{EP}", json.dumps(busy).encode())
    assert r.status == 200, (r.status, r.body[:300])


def test_separator_limit_is_exact():
    from fastllava.server.bodies import MAX_JSON_SEPARATORS, parse_json
    from fastllava.server.errors import ApiError

    at_limit = b"[" + b"0," * MAX_JSON_SEPARATORS + b"0]"
    assert len(parse_json(at_limit)) == MAX_JSON_SEPARATORS + 1
    with pytest.raises(ApiError, match="separators"):
        parse_json(b"[" + b"0," * (MAX_JSON_SEPARATORS + 1) + b"0]")
