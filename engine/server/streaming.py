"""Engine work off the event loop: a blocking snapshot iterator run in its own thread.

`engine_events(make_iter, metrics)` starts one daemon thread per request that creates the engine
iterator (llava.stream / stream_detailed) and pushes each snapshot to the event loop. The
consumer is an async generator; when it stops early (client gone, the response task cancelled)
a flag is set and the thread closes the engine iterator at the next
snapshot — at most one more token — which frees the request's KV pages. A dedicated thread per
request (not the shared threadpool) means a request waiting for the engine lock never starves
the store calls and other threadpool work of the server.

Requests without a streamed response (fal sync run, OpenAI non-stream) await their result with
`last_snapshot(request, events)`, which also watches the connection: a client that disconnects
cancels its request within one engine step, as a closed stream does.

Per token, the event loop only moves one snapshot from the queue to the consumer: text work that
grows with the request (stop strings, see stops.apply_stops) runs on the request's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from starlette.responses import StreamingResponse

from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger("fastllava.server")


async def engine_events(make_iter: Callable[[], Iterator[dict]],
                        metrics: Metrics | None) -> AsyncIterator[dict]:
    """Yield the snapshots of `make_iter()` as they are produced; re-raise its exception.

    Records ttft / latency / completion tokens into `metrics` when the thread finishes (tokens:
    the snapshot's "completion_tokens" when present, else the snapshot count)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def work() -> None:
        start, ttft, tokens, ok, last, cancelled = time.monotonic(), None, 0, False, None, False
        try:
            it = make_iter()
            try:
                for item in it:  # per token (every_token=True): the stop flag is seen at once
                    if ttft is None:
                        ttft = time.monotonic() - start
                    tokens = item.get("completion_tokens", tokens + 1)
                    if item["output"] != last or not item["partial"]:  # only news to the client
                        last = item["output"]
                        post("item", item)
                    if stop.is_set():  # the consumer is gone before the end: a cancel
                        cancelled = True
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            ok = True
            post("end", None)
        except BaseException as e:  # handed to the consumer
            post("error", e)
        finally:
            if metrics is not None:
                metrics.record(ttft, time.monotonic() - start, tokens, ok)
                metrics.leave(cancelled)

    if metrics is not None:
        metrics.enter()
    threading.Thread(target=work, name="fastllava-request", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()


async def first_and_rest(events: AsyncIterator[dict]) -> tuple[dict | None, AsyncIterator[dict]]:
    """Await the first snapshot (so validation / image errors surface before any response
    header is sent); returns it and the iterator of the rest. None: the stream was empty."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return None, events
    return first, events


async def chained(first: dict | None, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """`first_and_rest`'s two parts as one iterator again."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _disconnect(receive) -> None:
    """Returns when the client has gone (the request body must be read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def last_snapshot(request, events: AsyncIterator[dict]) -> dict | None:
    """The last snapshot of `events` (None: there was none); re-raises its exception. When the
    client disconnects first, `events` is closed (the engine stops at its next token and frees
    the request's KV pages) and a 499 ApiError is raised: its answer reaches nobody, but the
    route ends without a traceback."""
    async def drain():
        last = None
        async for snap in events:
            last = snap
        return last

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled itself
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
        await events.aclose()
    if work.cancelled():
        log.info("client disconnected from %s %s: request cancelled", request.method,
                 request.url.path)
        raise ApiError(499, "client disconnected", "client_cancelled")
    return work.result()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, also when the client
    disconnects mid-stream, so the engine stops at the next token instead of at garbage
    collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
