"""One HTTP/1.1 request sent byte for byte (no client-side normalisation of the path, the
headers or the body), and the checks every error answer of the server must pass.

    r = raw_request(server, "GET", "/x/requests/a%00b/status", headers=[("Authorization", ...)])
    check_clean_answer(r, openai=False)

A connection the server closes without a complete answer raises AssertionError ("dropped").
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
import ssl

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]     # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))   # strict: the body must be UTF-8


def raw_request(server, method: str, target: str, body: bytes = b"",
                headers: list[tuple[str, str]] = (), timeout: float = 60) -> RawResponse:
    """`target` is sent as given (percent-escapes included); Host is `server`'s unless a
    header sets it; Content-Length is always sent (framing is not what these tests probe)."""
    if server.ca:
        conn = http.client.HTTPSConnection("localhost", server.port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=server.ca))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if not any(k.lower() == "host" for k, _ in headers):
            conn.putheader("Host", f"localhost:{server.port}")
        for name, value in headers:
            conn.putheader(name, value.encode("latin-1"))
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    except (http.client.HTTPException, ConnectionError, socket.timeout) as e:
        raise AssertionError(f"dropped connection on {method} {target[:200]!r}: "
                             f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()


def _no_surrogates(value) -> bool:
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) < 0xE000 for c in value)
    if isinstance(value, dict):
        return all(_no_surrogates(k) and _no_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_no_surrogates, value))
    return True


def check_clean_answer(r: RawResponse, *, openai: bool, what: str = "") -> None:
    """No 5xx; a valid request id header; an error is JSON of the protocol's shape (fal:
    {"detail", "error_type"} or the 422 list {"detail": [{"loc", "msg", "type"}]}; OpenAI:
    {"error": {message, type, param, code}}); every JSON/SSE body is strict UTF-8 JSON."""
    where = f"{what} → {r.status} {r.body[:300]!r}"
    assert r.status < 500, where
    assert REQUEST_ID.fullmatch(r.headers.get("x-fal-request-id", "")), (r.headers, where)
    ctype = r.headers.get("content-type", "")
    if r.status >= 400:
        assert ctype.startswith("application/json"), where
        body = r.json()
        assert _no_surrogates(body), where
        if openai:
            assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_KEYS, where
            assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
        elif r.status == 422 and isinstance(body.get("detail"), list):
            assert body["detail"] and all({"loc", "msg", "type"} <= set(d)
                                          for d in body["detail"]), where
        else:
            assert body.get("detail") and isinstance(body.get("error_type"), str), where
    elif ctype.startswith("application/json"):
        r.json()
    elif ctype.startswith("text/event-stream"):
        for line in r.body.decode("utf-8").splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
