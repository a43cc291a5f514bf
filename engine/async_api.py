"""`LLaVA`'s asyncio entry points, `astream` and `agenerate`: the same requests and snapshots as
the thread API (fastllava.api), delivered to an event loop. The image is fetched and preprocessed
in the loop's default executor; engine events reach the loop with call_soon_threadsafe, so the
loop never blocks on the engine thread."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator, Mapping

from fastllava.evaluation import check_logprobs
from fastllava.messages import chat_messages
from fastllava.snapshots import Snapshots


class AsyncMixin:
    """Mixed into `LLaVA`: uses its _parse, prepare, _sequence, _stop_ids, engine, tokenizer."""

    def astream(self, request: Mapping[str, Any], *, messages: list[dict] | None = None,
                detailed: bool = False, every_token: bool = False,
                max_tokens_limit: int = 4096, max_prompt_chars: int = 16384,
                logprobs: int | None = None) -> AsyncIterator[dict]:
        """`stream` for asyncio: an async iterator of the same snapshots (`stream_detailed`'s with
        detailed=True, `logprobs` included). The request is validated here, eagerly; the image
        is fetched in the default executor. Closing the iterator early (aclose, or breaking out
        of `async for`) cancels the request."""
        sampling = {"logprobs": check_logprobs(logprobs)}
        messages = chat_messages(messages)
        if detailed:
            req = self._parse(request, messages, max_tokens_limit=max_tokens_limit,
                              max_prompt_chars=max_prompt_chars)
        else:
            req = self._parse(request, messages)
        return self._aevents(req, messages, every_token, detailed, sampling)

    async def agenerate(self, request: Mapping[str, Any]) -> dict:
        """`generate` for asyncio: concurrent awaits share the engine's batches."""
        out = None
        async for out in self.astream(request):
            pass
        return out

    async def _aevents(self, req, messages, every_token, detailed, sampling
                       ) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            None, functools.partial(self.prepare, req, messages=messages))
        snapshots = Snapshots(self.tokenizer, self._stop_ids(sampling), len(prepared.input_ids),
                              every_token)
        events: asyncio.Queue = asyncio.Queue()

        def put(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        handle = self.engine.submit(self._sequence(prepared, req, sampling), put)
        try:
            while True:
                kind, value = await events.get()
                snapshot = snapshots.on_event(kind, value, handle)
                if snapshot is not None:
                    yield snapshot if detailed else {"output": snapshot["output"],
                                                     "partial": snapshot["partial"]}
                if kind != "token":
                    return
        finally:
            self.engine.cancel(handle, wait_s=None)   # never block the event loop

