"""Engine work off the event loop: a blocking snapshot iterator run in its own thread.

`engine_events(make_iter, metrics)` starts one daemon thread per request that creates the engine
iterator (llava.stream / stream_detailed) and pushes each snapshot to the event loop. The
consumer is an async generator; when it stops early (client gone, stop string matched, the
response task cancelled) a flag is set and the thread closes the engine iterator at the next
snapshot — at most one more token — which frees the request's KV pages. A dedicated thread per
request (not the shared threadpool) means a request waiting for the engine lock never starves
the store calls and other threadpool work of the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from starlette.responses import StreamingResponse

from .metrics import Metrics


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
        start, ttft, tokens, ok, last = time.monotonic(), None, 0, False, None
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
                    if stop.is_set():
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
                metrics.leave()

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
