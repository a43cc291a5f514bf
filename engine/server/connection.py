"""Connection hygiene: deadlines for reading a request, quiet aborted uploads, HEAD as GET.

uvicorn (0.54) closes idle keep-alive connections (timeout_keep_alive) but sets no deadline on a
request's head or body: a client sending its headers one byte a second, or a chunked body that never
ends, holds a connection (and a task) forever. Two guards:

- `header_timeout_protocol(timeout_s)`: uvicorn's HTTP/1.1 protocol class (h11, or httptools when
  installed: what http="auto" picks) with a deadline: the request line and headers must be complete
  within timeout_s of the connection opening, or of the previous response's end; otherwise the
  connection is closed (one INFO line). Passed to uvicorn as `http=`.
- `BodyTimeoutMiddleware`: the whole body must arrive within timeout_s of the head; otherwise a 408
  in the route's protocol shape (fal: {"detail", "error_type": "request_timeout"}, OpenAI: an error
  object) with `Connection: close`. A client that disconnects mid-body is logged as one INFO line
  and answered (to nobody) with a 499, instead of a ClientDisconnect traceback from the route.
"""

from __future__ import annotations

import asyncio
import logging

from .errors import ApiError

log = logging.getLogger("fastllava.server")


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's auto-selected HTTP/1.1 protocol with a request-head deadline of timeout_s."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        # uvicorn's protocols set `self.cycle` to a new RequestResponseCycle as soon as a
        # request's head is parsed: a deadline armed while waiting for a head is met when
        # `cycle` is no longer the one seen at arming time.
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Waiting for the next head unless a pipelined request is already in (then its
            # response re-arms the deadline).
            if not self.transport.is_closing() and (self.cycle is None
                                                    or self.cycle.response_complete):
                self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_overdue, self.cycle)

        def _head_overdue(self, cycle) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():
                peer = self.client[0] if self.client else "?"
                log.info("closed a connection from %s: no complete request head within %g s "
                         "(--header-timeout-s)", peer, timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


class BodyTimeoutMiddleware:
    """ASGI middleware: the request body must be complete within `timeout_s` of the head (the
    app's call); aborted uploads end quietly. Outermost, so every reader of the body is covered
    (the gateway's chunked-body reader and the routes alike)."""

    def __init__(self, app, *, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, complete = loop.time() + self.timeout_s, False

        async def receive_in_time():
            nonlocal complete
            if complete:  # after the body: disconnect watchers wait here without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                complete = True
                log.info("%s %s: request body not complete within %g s (--body-timeout-s); "
                         "answered 408", scope["method"], scope["path"], self.timeout_s)
                raise ApiError(408, f"the request body did not arrive within {self.timeout_s:g} "
                               "s (--body-timeout-s)", "request_timeout",
                               code="request_timeout", headers={"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                complete = True
                log.info("%s %s: client disconnected while sending the request body",
                         scope["method"], scope["path"])
                raise ApiError(499, "client disconnected while sending the body",
                               "client_disconnected")
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)


class HeadAsGetMiddleware:
    """HEAD is answered as the GET of the same URL without its body (RFC 9110 9.3.2: the same
    status and headers, Content-Length included), so monitors and load balancers that probe with
    HEAD get /health's answer instead of a 404.

    The routes see a GET. A streaming GET (server-sent events) ends after its headers: the app is
    told the client left (its receive() answers http.disconnect, which Starlette's streaming
    response watches when the scope's ASGI spec is below 2.4; it is set to 2.3 here) and any
    later body message is dropped."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        done = asyncio.Event()

        async def send_head(message):
            if message["type"] != "http.response.body":
                return await send(message)
            if not done.is_set():
                done.set()
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def receive_head():
            if done.is_set():
                return {"type": "http.disconnect"}
            waits = [asyncio.ensure_future(receive()), asyncio.ensure_future(done.wait())]
            finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            return waits[0].result() if waits[0] in finished else {"type": "http.disconnect"}

        asgi = {**scope.get("asgi", {}), "spec_version": "2.3"}
        await self.app({**scope, "method": "GET", "asgi": asgi}, receive_head, send_head)
