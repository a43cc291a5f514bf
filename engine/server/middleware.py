"""The gateway: one pure-ASGI middleware in front of every route.

In order, for each HTTP request:
1. fal JS proxy: a request carrying `x-fal-target-url` (the @fal-ai/client `proxyUrl` mode sends
   every call to the proxy with the original URL in that header) is routed by that URL's path; a
   target host starting with "queue." is routed to the queue API (`/queue/...`). A malformed
   target is a 400 bad_request, answered after the auth check.
2. A request id (uuid4 hex) in scope["state"]["request_id"]; every response, errors and 404s
   included, carries it as `x-fal-request-id` unless the route set its own (a job's id).
3. Auth, when API keys are configured: `Authorization: Key <key>` or `Bearer <key>`; 401
   otherwise. `open_paths` stay open: /health (load balancers), /metrics with --metrics-open.
4. Unhandled exceptions → 500 internal_error (logged with the traceback, never sent).
5. Body limit: Content-Length over max_body_bytes → 413 before reading; chunked bodies are read
   up to the limit and then replayed to the app. After the replay, receive() is the server's own,
   so streaming responses still see the client's disconnect.
Error answers take the OpenAI shape under /v1, fal's otherwise (errors.py).
"""

from __future__ import annotations

import hmac
import logging
import uuid
from urllib.parse import quote_from_bytes, unquote, urlsplit

from .errors import ApiError, error_response

OPEN_PATHS = ("/health",)
_URL_SAFE = bytes(range(0x21, 0x7F))   # printable ASCII stays as sent (escapes included)
log = logging.getLogger("fastllava.server")


class GatewayMiddleware:
    def __init__(self, app, *, api_keys: tuple[str, ...], max_body_bytes: int,
                 open_paths: tuple[str, ...] = OPEN_PATHS):
        self.app = app
        self.open_paths = open_paths
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scope = dict(scope)
        target = headers.get("x-fal-target-url")
        target_error = None
        if target:
            try:
                scope.update(_proxied(target))
            except ValueError as e:  # answered after the auth check, like any other error
                target_error = ApiError(400, f"x-fal-target-url is not a valid URL ({e})",
                                        "bad_request", param="x-fal-target-url")
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"] = {**scope["state"], "request_id": request_id}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"x-fal-request-id" not in names:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-fal-request-id", request_id.encode())]}
            await send(message)

        path = scope["path"]
        try:
            if self.api_keys and (path not in self.open_paths or target_error):
                self._authorize(headers.get("authorization", ""))
            if target_error:
                raise target_error
            receive = await self._limit_body(headers, receive)
        except ApiError as e:
            return await error_response(path, e)(scope, receive, send_with_id)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            # Answer here rather than in Starlette's outermost error middleware, so that a 500
            # carries x-fal-request-id and the protocol's error shape too.
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if started:
                raise
            await error_response(path, ApiError(
                500, "internal error; see the server log", "internal_error"))(
                scope, receive, send_with_id)

    def _authorize(self, header: str) -> None:
        scheme, _, key = header.strip().partition(" ")
        # The headers were decoded as latin-1 (lossless): encoding back gives the bytes the client
        # sent, which for a non-ASCII key are its UTF-8 (curl, browsers). Encoding the latin-1
        # text as UTF-8 instead would turn each such byte into two, and that key would never match.
        key = key.strip().encode("latin-1")
        if scheme.lower() not in ("key", "bearer") or not key:
            raise ApiError(401, "missing credentials: send 'Authorization: Key <api key>' "
                           "(or 'Bearer <api key>')", "unauthorized", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Key, Bearer realm="fastllava"'})
        # Compare with every key in constant time (no early exit on a match).
        matches = [hmac.compare_digest(key, k) for k in self.api_keys]
        if not any(matches):
            raise ApiError(401, "invalid API key", "unauthorized", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Key, Bearer realm="fastllava"'})

    async def _limit_body(self, headers: dict[str, str], receive):
        limit = self.max_body_bytes
        too_big = ApiError(413, f"request body is over the limit of {limit} bytes "
                           "(--max-body-bytes)", "request_too_large", code="request_too_large")
        length = headers.get("content-length")
        if length is not None:
            if length.strip().isascii() and length.strip().isdigit() and int(length) > limit:
                raise too_big
            return receive  # the server enforces Content-Length framing itself
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                       receive)


def _proxied(target: str) -> dict:
    """The scope entries that route a JS-proxy request like a direct request to `target` (see
    step 1); ValueError for a malformed URL."""
    parts = urlsplit(target)
    prefix = "/queue" if (parts.hostname or "").startswith("queue.") else ""
    raw = prefix + (parts.path if parts.path.startswith("/") else "/" + parts.path)
    # ASGI: raw_path and query_string keep the URL's percent-escapes, path is decoded, as the
    # server does for a direct request, so a proxied call routes exactly like a direct one.
    # A direct request line is ASCII (the HTTP server refuses other bytes); the header is not,
    # so its other bytes are percent-encoded here as a client would have done.
    raw, query = (quote_from_bytes(x.encode("latin-1"), safe=_URL_SAFE)
                  for x in (raw, parts.query))
    return {"raw_path": raw.encode(), "path": unquote(raw), "query_string": query.encode()}


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
