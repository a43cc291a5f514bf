"""/openapi.json and /docs describe the real routes: every route is listed, POST routes have
request bodies, the documented status codes are there, the fal input is the one
fastllava.schema validates, and real answers of the real server validate against the declared
schemas. Auth: the document and /docs are behind the API key when keys are set; /metrics too,
unless --metrics-open."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import httpx
import jsonschema
import pytest
from fastapi.routing import APIRoute

from fastllava import schema
from fastllava.server.app import create_app
from fastllava.server.settings import ServerSettings
from serverkit import API_KEY

EP = "fal-ai/llavav15-13b"
LENIENT_MAX_TOKENS = 2048  # conftest's lenient_server: --max-tokens-limit 2048


class _StubModel:
    class config:
        kind = "llava"


@pytest.fixture(scope="module")
def client(lenient_server):
    with lenient_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def doc(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def req(data_uri):
    return {"image_url": data_uri, "prompt": "What is in the image?", "max_tokens": 6,
            "temperature": 0}


def _template(doc: dict, path: str) -> str:
    """The document's path template that a concrete path matches (most specific first)."""
    for template in sorted(doc["paths"], key=lambda t: (t.count("{"), -len(t))):
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path):
            return template
    raise AssertionError(f"no documented path matches {path}")


def _validate(doc: dict, declared: dict, body) -> None:
    jsonschema.validate(body, {**declared, "components": doc["components"]})


def check(doc: dict, r: httpx.Response, sse_events: list | None = None) -> None:
    """r's status is documented for its route, and its body (or each SSE event) validates."""
    path = r.request.url.path
    op = doc["paths"][_template(doc, path)][r.request.method.lower()]
    answer = op["responses"].get(str(r.status_code))
    assert answer is not None, f"{r.request.method} {path} answered undocumented {r.status_code}"
    if sse_events is not None:
        declared = answer["content"]["text/event-stream"]["x-event-schema"]
        for event in sse_events:
            _validate(doc, declared, event)
        return
    _validate(doc, answer["content"]["application/json"]["schema"], r.json())


def _events(r: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _api_routes(routes):
    """The app's documented routes; newer FastAPI keeps included routers as one entry each."""
    for route in routes:
        router = getattr(route, "original_router", None)
        if router is not None:
            yield from _api_routes(router.routes)
        elif isinstance(route, APIRoute) and route.include_in_schema:
            yield route


def test_every_route_is_documented_with_bodies_and_status_codes(doc):
    app = create_app(ServerSettings(model="m"), _StubModel())
    routes = {(method.lower(), route.path_format) for route in _api_routes(app.routes)
              for method in route.methods}
    documented = {(m, p) for p, methods in doc["paths"].items() for m in methods}
    assert routes and routes == documented, routes ^ documented
    for method, path in routes:
        op = doc["paths"][path][method]
        codes = set(op["responses"])
        assert codes & {"200", "202"} and codes - {"200", "202"}, (method, path, codes)
        if method == "post":
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], (path, ref)
    expected = {  # (method, path): status codes the handlers answer
        ("post", "/queue/{owner}/{alias}"): {"200", "401", "404", "413", "422"},
        ("get", "/queue/{owner}/{alias}/requests/{request_id}/status"): {"200", "202", "404"},
        ("get", "/{owner}/{alias}/requests/{request_id}"): {"200", "400", "404", "422", "499"},
        ("put", "/queue/{owner}/{alias}/requests/{request_id}/cancel"): {"202", "400", "404"},
        ("post", "/{owner}/{alias}"): {"200", "400", "404", "413", "422", "500"},
        ("post", "/{owner}/{alias}/stream"): {"200", "404", "422"},
        ("post", "/v1/chat/completions"): {"200", "400", "401", "404", "413"},
        ("get", "/health"): {"200", "503"},
    }
    for (method, path), codes in expected.items():
        got = set(doc["paths"][path][method]["responses"])
        assert codes <= got, (method, path, codes - got)
    stream_200 = doc["paths"]["/{owner}/{alias}/stream"]["post"]["responses"]["200"]["content"]
    assert set(stream_200) == {"text/event-stream"}, stream_200


def test_fal_input_is_the_validators_schema(doc):
    fal = doc["components"]["schemas"]["FalInput"]
    props = fal["properties"]
    fields = dataclasses.fields(schema.GenerationRequest)
    assert set(props) == {f.name for f in fields} | set(schema.ALIASES), props
    assert [f.name for f in fields] == list(schema.FIELDS)
    assert set(fal["required"]) == {f.name for f in fields if f.default is dataclasses.MISSING}
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert props[f.name]["default"] == f.default, (f.name, props[f.name])
    assert fal["additionalProperties"] is False
    # The server's limits, not the defaults: the document follows --max-tokens-limit.
    assert props["max_tokens"]["maximum"] == LENIENT_MAX_TOKENS
    assert props["prompt"]["maxLength"] == ServerSettings.max_prompt_chars
    # Same verdict as the validator, at and across each boundary.
    base = {"image_url": "https://x.example/a.png", "prompt": "hi"}
    cases = [{}, {"max_tokens": 1}, {"max_tokens": 0}, {"max_tokens": LENIENT_MAX_TOKENS},
             {"max_tokens": LENIENT_MAX_TOKENS + 1}, {"max_new_tokens": 5},
             {"max_new_tokens": 0}, {"temperature": 0}, {"temperature": 2.0},
             {"temperature": 2.5}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1},
             {"top_p": 1.5}, {"seed": None}, {"seed": 0}, {"seed": -1}, {"seed": 2**63},
             {"prompt": ""}, {"prompt": "x" * (ServerSettings.max_prompt_chars + 1)},
             {"image_url": ""}, {"colour": "red"}, {"prompt": 5}, {"max_tokens": "6"}]
    validator = jsonschema.Draft202012Validator({**fal, "components": doc["components"]})
    for case in cases:
        data = {**base, **case}
        ok = not schema.validate_all(data, max_tokens_limit=LENIENT_MAX_TOKENS)
        valid = validator.is_valid(data)
        assert valid == ok, (case, "validator accepts" if ok else "validator refuses")


def test_real_answers_match_the_declared_schemas(doc, client, req):
    check(doc, client.get("/health"))
    check(doc, client.get("/v1/models"))
    sync = client.post(f"/{EP}", json=req)
    assert sync.status_code == 200, sync.text
    check(doc, sync)
    stream = client.post(f"/{EP}/stream", json=req)
    assert stream.status_code == 200 and _events(stream), stream.text
    check(doc, stream, _events(stream))
    check(doc, client.post(f"/{EP}", json={**req, "top_p": 0, "colour": 1}))    # 422
    check(doc, client.post("/nobody/none", json=req))                           # 404

    submitted = client.post(f"/queue/{EP}", json=req, params={"fal_webhook": "http://127.0.0.1:9/"})
    check(doc, submitted)
    job = submitted.json()
    queued = client.get(job["status_url"], params={"logs": 1})
    check(doc, queued)
    for _ in range(600):
        done = client.get(job["status_url"], params={"logs": 1})
        if done.status_code == 200:
            break
        time.sleep(0.05)
    check(doc, done)
    check(doc, client.get(job["response_url"]))
    check(doc, client.put(job["cancel_url"]))                                   # 400 completed
    check(doc, client.put(f"/queue/{EP}/requests/nope/cancel"))                 # 404
    check(doc, client.get(f"/queue/{EP}/requests/nope"))                        # 404

    chat = {"model": EP, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": req["image_url"]}}]}]}
    jsonschema.validate(chat, {"$ref": "#/components/schemas/ChatCompletionRequest",
                               "components": doc["components"]})
    check(doc, client.post("/v1/chat/completions", json=chat))
    chunks = client.post("/v1/chat/completions",
                         json={**chat, "stream": True, "stream_options": {"include_usage": True}})
    check(doc, chunks, _events(chunks))
    check(doc, client.post("/v1/chat/completions", json={**chat, "model": "other"}))   # 404
    check(doc, client.post("/v1/chat/completions", json={**chat, "messages": []}))     # 400


def test_docs_page_is_html(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.headers
    assert "swagger" in r.text.lower() and "/openapi.json" in r.text


def test_schema_docs_and_metrics_auth(server_factory, tiny_llava, strict_server):
    key = {"Authorization": f"Key {API_KEY}"}
    with strict_server.client() as c:   # keys, no --metrics-open
        for path in ("/openapi.json", "/docs", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=key).status_code == 200, path
        doc = c.get("/openapi.json", headers=key).json()
        assert doc["paths"]["/metrics"]["get"]["security"] == [{"ApiKey": []}]
        assert "security" not in doc["paths"]["/health"]["get"]
    server = server_factory(tiny_llava, "--api-key", API_KEY, "--metrics-open")
    with server.client() as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "fastllava_generation_tokens_total" in r.text, r.text
        for path in ("/openapi.json", "/docs", "/v1/models"):
            assert c.get(path).status_code == 401, path
        doc = c.get("/openapi.json", headers=key).json()
        metrics = doc["paths"]["/metrics"]["get"]
        assert "security" not in metrics and "401" not in metrics["responses"], metrics
        assert doc["paths"]["/v1/models"]["get"]["security"] == [{"ApiKey": []}]
