"""The `n` choices of one OpenAI chat, as one stream of (index, snapshot).

Choice 0 validates and prepares the request (images fetched once, on its thread) and runs first;
once its first snapshot is out, its prompt's full KV pages are committed, and choices 1..n-1 start
from the prefix cache: the prompt is prefilled once. Each choice is its own engine request (its
own cancellation, stop strings and metrics) with a seed from `fastllava.evaluation.choice_seeds`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Callable, Iterator

from fastllava.evaluation import choice_seeds

from .streaming import chained, engine_events, first_and_rest


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(index, item) from all `streams` as they come; the first error is re-raised. Closing this
    closes every stream (each engine request stops at its next token)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, None, None))
        except Exception as e:  # handed to the consumer
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                left -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def indexed(events: AsyncIterator[dict]) -> AsyncIterator[tuple[int, dict]]:
    """One choice's snapshots as (0, snapshot), the shape `choice_events` yields."""
    try:
        async for item in events:
            yield 0, item
    finally:
        await events.aclose()


def choice_events(n: int, prepare: Callable[[], tuple],
                  stream: Callable[..., Iterator[dict]], metrics
                  ) -> AsyncIterator[tuple[int, dict]]:
    """`prepare()` → (request, prepared) runs on choice 0's thread; `stream(req, prepared)` →
    that choice's snapshots (stop strings applied by the caller's function)."""
    ready: dict = {}

    def make(i: int) -> Callable[[], Iterator[dict]]:
        def start() -> Iterator[dict]:
            if i == 0:
                req, prepared = prepare()
                ready["seeds"] = choice_seeds(req.seed, n)
                ready["prepared"] = (req, prepared)
            req, prepared = ready["prepared"]
            return stream(dataclasses.replace(req, seed=ready["seeds"][i]), prepared)
        return start

    async def run() -> AsyncIterator[tuple[int, dict]]:
        first, rest = await first_and_rest(engine_events(make(0), metrics))
        others = [engine_events(make(i), metrics) for i in range(1, n)]
        async for item in merged([chained(first, rest), *others]):
            yield item

    return run()
