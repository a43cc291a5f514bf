"""API keys: any key the server accepts can authenticate a request (the header carries its UTF-8
bytes, as curl and browsers send them); a key that no header could carry is refused at startup,
not answered with 401 forever."""

from __future__ import annotations

import asyncio

import pytest

from fastllava.server.middleware import GatewayMiddleware
from fastllava.server.settings import ServerSettings


def _status(api_key: str, header_value: bytes) -> int:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    gateway = GatewayMiddleware(app, api_keys=(api_key,), max_body_bytes=1000)
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models",
             "query_string": b"", "headers": [(b"authorization", header_value)]}
    asyncio.run(gateway(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize("key", ["plain-ascii-key", "clé-secrète", "ключ", "鍵🔑"])
def test_every_accepted_key_authenticates_with_its_utf8_bytes(key):
    for scheme in (b"Key ", b"Bearer "):
        assert _status(key, scheme + key.encode()) == 200, key
    assert _status(key, b"Key " + key.encode() + b"x") == 401


@pytest.mark.parametrize("key", [" leading", "trailing ", "new\nline", "tab\tin", "\x7fdel",
                                 "surrogate\udcff"])
def test_keys_no_header_can_carry_are_refused_at_startup_without_echoing_them(key):
    with pytest.raises(ValueError, match="API key 2 of 2") as e:
        ServerSettings(model="m", api_keys=("good", key))
    assert key.strip() not in str(e.value)
