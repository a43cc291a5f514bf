"""The exact HTTP requests of the JS client `@fal-ai/client` (1.10.1), replayed with httpx against
the real server (conftest strict_server: TLS, API keys), so CI covers the JS client without node.

What the client sends (read from its source, src/request.js, queue.js, streaming.js, middleware.js,
and recorded from a real run against this server):
- every call: `Authorization: Key <credentials>` (when set), `Accept: application/json`,
  `Content-Type: application/json` (GETs and the cancel PUT too, with no body),
  `User-Agent: @fal-ai/client/<version>`; bodies are JSON.stringify'd (compact).
- URLs are rebuilt from the endpoint id, never taken from submit's response_url:
  run `POST https://fal.run/{ep}`, stream `POST https://fal.run/{ep}/stream` (+ `accept:
  text/event-stream`, which fetch merges into "application/json, text/event-stream"), submit
  `POST https://queue.fal.run/{ep}[/{path}][?fal_webhook=…]` (+ `x-fal-queue-priority: normal`),
  status `GET https://queue.fal.run/{owner}/{alias}/requests/{id}/status?logs=1|0`, status stream
  `…/status/stream?logs=…` (SSE), result `GET …/requests/{id}`, cancel `PUT …/requests/{id}/cancel`.
- proxy mode (`proxyUrl: {url, when: "always"}`): each of those goes to the proxy URL, method
  and body kept, the fal URL in `x-fal-target-url`. rewrite mode: a requestMiddleware maps
  https://queue.fal.run/ → {server}/queue/ and https://fal.run/ → {server}/.
What the client needs back: JSON answers with `application/json` in Content-Type (a 422 becomes
ValidationError, whose getFieldErrors(f) matches `detail[i].loc[-1] == f`; other non-2xx answers
ApiError with the status); `x-fal-request-id` (the result's requestId); SSE with a Content-Type
starting `text/event-stream` whose every event's data is JSON (it JSON.parses each one and
resolves with the last).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from urllib.parse import urlencode

import pytest

from serverkit import API_KEY

EP = "fal-ai/llavav15-13b"
RUN, QUEUE = f"https://fal.run/{EP}", f"https://queue.fal.run/{EP}"
PROXY = "/api/fal/proxy"
JS_HEADERS = {"Accept": "application/json", "Content-Type": "application/json",
              "User-Agent": "@fal-ai/client/1.10.1"}
SSE_ACCEPT = {"Accept": "application/json, text/event-stream"}
NO_ID = []   # responses without x-fal-request-id


class JsClient:
    """Sends what @fal-ai/client sends for a fal URL, in proxy or rewrite mode."""

    def __init__(self, client, mode: str, key: str | None = API_KEY):
        self.http, self.mode, self.key = client, mode, key

    def request(self, method: str, fal_url: str, body=None, headers=None, stream=False):
        h = {**({"Authorization": f"Key {self.key}"} if self.key else {}), **JS_HEADERS,
             **(headers or {})}
        if self.mode == "proxy":
            url, h["x-fal-target-url"] = PROXY, fal_url
        else:
            url = fal_url.replace("https://queue.fal.run/", "/queue/").replace(
                "https://fal.run/", "/")
        content = None if body is None else json.dumps(body, separators=(",", ":"))
        req = self.http.build_request(method, url, headers=h, content=content)
        response = self.http.send(req, stream=stream)
        if "x-fal-request-id" not in response.headers:
            NO_ID.append(f"{method} {fal_url} ({self.mode}) → {response.status_code}")
        return response

    def json(self, method: str, fal_url: str, body=None, status=(200,), headers=None) -> dict:
        r = self.request(method, fal_url, body, headers)
        assert r.status_code in status, (method, fal_url, self.mode, r.status_code, r.text)
        assert "application/json" in r.headers["content-type"], r.headers
        return r.json()

    def sse(self, method: str, fal_url: str, body=None) -> list[dict]:
        """The events as FalStream sees them: every data payload JSON-parsed."""
        r = self.request(method, fal_url, body, SSE_ACCEPT, stream=True)
        try:
            assert r.status_code == 200, (fal_url, r.status_code, r.read())
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            text = r.read().decode()
        finally:
            r.close()
        events = []
        for block in text.replace("\r\n", "\n").split("\n\n"):
            data = [ln[5:].lstrip(" ") for ln in block.split("\n") if ln.startswith("data:")]
            if data:
                events.append(json.loads("\n".join(data)))   # a non-JSON event fails here
        return events

    def wait_status(self, request_id: str, want: str, timeout: float = 60) -> dict:
        """Poll like subscribe() does (logs=1) until the status is `want`."""
        end, seen = time.monotonic() + timeout, []
        while time.monotonic() < end:
            body = self.json("GET", f"{QUEUE}/requests/{request_id}/status?logs=1",
                             status=(200, 202))
            seen.append(body["status"])
            assert body["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), body
            assert isinstance(body["logs"], list), body
            if body["status"] == want:
                return body
            time.sleep(0.05)
        raise AssertionError(f"{request_id} never reached {want} ({self.mode}); saw {seen}")


@pytest.fixture(scope="module")
def web(strict_server):
    with strict_server.client() as c:
        yield c
    assert not NO_ID, f"responses without x-fal-request-id: {NO_ID}"


@pytest.fixture(scope="module")
def req(data_uri):
    return {"image_url": data_uri, "prompt": "What is in the image?", "max_tokens": 6,
            "temperature": 0}


@pytest.mark.parametrize("mode", ["proxy", "rewrite"])
def test_run_subscribe_stream(web, req, mode):
    js = JsClient(web, mode)
    ran = js.json("POST", RUN, req)
    assert ran["partial"] is False and isinstance(ran["output"], str), ran
    # subscribe = submit, poll status?logs=1 until COMPLETED, then result.
    sub = js.json("POST", QUEUE, req, headers={"x-fal-queue-priority": "normal"})
    assert sub["status"] == "IN_QUEUE" and sub["request_id"], sub
    done = js.wait_status(sub["request_id"], "COMPLETED")
    assert done["logs"] and done["metrics"]["inference_time"] >= 0, done
    r = js.request("GET", f"{QUEUE}/requests/{sub['request_id']}")
    assert r.status_code == 200 and r.json() == ran, (r.status_code, r.text, ran)
    assert r.headers["x-fal-request-id"] == sub["request_id"], dict(r.headers)
    # subscribe(mode: "streaming"): the status stream resolves with its last event.
    sub = js.json("POST", QUEUE, req)
    events = js.sse("GET", f"{QUEUE}/requests/{sub['request_id']}/status/stream?logs=1")
    assert events and events[-1]["status"] == "COMPLETED", events
    assert all(e["request_id"] == sub["request_id"] for e in events), events
    # fal.stream: cumulative snapshots, the last one final and equal to the sync run.
    snaps = js.sse("POST", f"{RUN}/stream", req)
    assert snaps and snaps[-1] == ran and all(s["partial"] for s in snaps[:-1]), (snaps, ran)
    for prev, cur in zip(snaps, snaps[1:]):
        assert cur["output"].startswith(prev["output"]), f"not cumulative: {prev} then {cur}"


@pytest.mark.parametrize("mode", ["proxy", "rewrite"])
def test_cancel_queued_and_running(web, req, mode):
    js = JsClient(web, mode)
    long = js.json("POST", QUEUE, dict(req, max_tokens=1500))["request_id"]
    short = js.json("POST", QUEUE, dict(req, max_tokens=4))["request_id"]
    js.wait_status(long, "IN_PROGRESS")
    queued = js.json("GET", f"{QUEUE}/requests/{short}/status?logs=0", status=(202,))
    assert queued["status"] == "IN_QUEUE" and queued["queue_position"] >= 0, queued
    for request_id in (short, long):   # the JS cancel sends no body, only the JSON headers
        assert js.json("PUT", f"{QUEUE}/requests/{request_id}/cancel", status=(202,))["status"] \
            == "CANCELLATION_REQUESTED"
    for request_id in (short, long):
        done = js.wait_status(request_id, "COMPLETED", timeout=20)
        assert done["error_type"] == "client_cancelled", done
        body = js.json("GET", f"{QUEUE}/requests/{request_id}", status=(499,))   # ApiError 499
        assert body["error_type"] == "client_cancelled", body
    again = js.json("PUT", f"{QUEUE}/requests/{long}/cancel", status=(400,))
    assert again["status"] == "ALREADY_COMPLETED", again


@pytest.mark.parametrize("mode", ["proxy", "rewrite"])
def test_validation_and_auth_errors(web, req, mode):
    js = JsClient(web, mode)
    bad = {"image_url": req["image_url"], "max_tokens": 0}
    for method, url in (("POST", RUN), ("POST", QUEUE), ("POST", f"{RUN}/stream")):
        body = js.json(method, url, bad, status=(422,))
        last = sorted(d["loc"][-1] for d in body["detail"])   # ValidationError.getFieldErrors
        assert last == ["max_tokens", "prompt"], (url, body)
    for key in (None, "wrong-key"):
        body = JsClient(web, mode, key).json("POST", QUEUE, req, status=(401,))
        assert body["error_type"] == "unauthorized", body


def test_proxy_target_query_path_and_escapes(web, req):
    """The target URL's query (fal_webhook, URLSearchParams-encoded) and endpoint path survive
    the proxy, and a percent-escaped target routes like the same URL sent directly."""
    hooks: list[tuple[str, dict]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hooks.append((self.path, json.loads(body)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    receiver = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True).start()
    try:
        js = JsClient(web, "proxy")
        hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook?a=1&b=2"
        sub = js.json("POST", f"{QUEUE}/sub/path?{urlencode({'fal_webhook': hook})}", req)
        assert sub["gateway_request_id"] == sub["request_id"], sub
        js.wait_status(sub["request_id"], "COMPLETED")   # status on owner/alias, no path
        end = time.monotonic() + 20
        while not hooks and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert hooks, "the webhook given in the proxied target URL was never called"
    path, payload = hooks[0]
    assert path == "/hook?a=1&b=2" and payload["request_id"] == sub["request_id"] \
        and payload["status"] == "OK", hooks
    # "a%20b" decodes to "a b" both ways: the same 404 naming the same id.
    direct = web.get(f"/queue/{EP}/requests/a%20b/status", headers={
        "Authorization": f"Key {API_KEY}"})
    proxied = js.request("GET", f"{QUEUE}/requests/a%20b/status")
    assert direct.status_code == proxied.status_code == 404, (direct.text, proxied.text)
    assert proxied.json()["detail"] == direct.json()["detail"], (direct.text, proxied.text)
    assert "'a b'" in proxied.json()["detail"], proxied.text
