"""Async HTTP drivers (httpx): one request of the workload → a `Trace`.

- openai: `POST {base}/v1/chat/completions` with one user message (text + image_url part),
  stream=true and stream_options.include_usage (vLLM, SGLang and fastllava send a usage chunk;
  without one the output tokens are the content chunks counted). Each SSE chunk with content is
  an output event. `--base-url` may end in /v1 or not.
- fal stream: `POST {base}/{endpoint}/stream`; SSE of cumulative snapshots `{"output",
  "partial"}`: a snapshot whose text grew is an output event; tokens = those events (exact for a
  server that snapshots every token, as fastllava does; an estimate otherwise).
- fal sync: `POST {base}/{endpoint}` → the output JSON (no stream: TTFT = e2e, tokens unknown).
- fal queue: submit `POST {base}/{endpoint}` (base = https://queue.fal.run, or a fastllava
  server's /queue prefix), poll the returned status_url until COMPLETED, GET the response_url.
Auth: fal `Authorization: Key $FAL_KEY` (or --api-key), OpenAI `Bearer $OPENAI_API_KEY`.
A non-2xx reply, an in-band error event or a transport error fails the request (its Trace.error).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from fastllava.benchmarks.stats import Trace
from fastllava.benchmarks.workload import Request

if TYPE_CHECKING:   # httpx (the server extra) is imported by whoever builds the client
    import httpx

FAL_MODES = ("stream", "sync", "queue")


def openai_root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id of GET /v1/models (what vLLM/SGLang expect in "model")."""
    r = await client.get(openai_root(base_url) + "/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}: /v1/models lists no model; pass --served-model")
    return data[0]["id"]


async def _sse(response: httpx.Response):
    """The JSON payloads of an SSE stream's `data:` lines ([DONE] ends it)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


async def _fail(response: httpx.Response, trace: Trace) -> Trace:
    body = (await response.aread()).decode(errors="replace")
    trace.error = f"HTTP {response.status_code}: {' '.join(body.split())[:200]}"
    return trace


async def openai_request(client: httpx.AsyncClient, base_url: str, model: str, req: Request,
                         temperature: float) -> Trace:
    body = {"model": model, "max_tokens": req.max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": req.prompt},
                {"type": "image_url", "image_url": {"url": req.image_url}}]}]}
    trace = Trace(time.perf_counter())
    async with client.stream("POST", openai_root(base_url) + "/chat/completions",
                             json=body) as r:
        if r.status_code != 200:
            return await _fail(r, trace)
        async for chunk in _sse(r):
            now = time.perf_counter()
            if "error" in chunk:
                trace.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                return trace
            if chunk.get("usage"):
                trace.tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    trace.events.append(now)
    trace.end = time.perf_counter()
    if trace.tokens is None:
        trace.tokens = len(trace.events)
    return trace


def _fal_body(req: Request, temperature: float) -> dict:
    return {"image_url": req.image_url, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": temperature}


async def fal_request(client: httpx.AsyncClient, base_url: str, endpoint: str, mode: str,
                      req: Request, temperature: float, poll_s: float) -> Trace:
    url = f"{base_url.rstrip('/')}/{endpoint.strip('/')}"
    body = _fal_body(req, temperature)
    trace = Trace(time.perf_counter())
    if mode == "stream":
        async with client.stream("POST", url + "/stream", json=body,
                                 headers={"Accept": "text/event-stream"}) as r:
            if r.status_code != 200:
                return await _fail(r, trace)
            seen = 0
            async for snap in _sse(r):
                now = time.perf_counter()
                if "output" not in snap:   # in-band error: {"detail", "error_type"}
                    trace.error = f"stream error: {json.dumps(snap)[:200]}"
                    return trace
                if len(snap["output"]) > seen:
                    seen = len(snap["output"])
                    trace.events.append(now)
        trace.end = time.perf_counter()
        trace.tokens = len(trace.events)
        return trace
    r = await client.post(url, json=body)
    if mode == "queue" and r.status_code == 200:
        r = await _queue_result(client, r.json(), poll_s)
    if r.status_code != 200:
        return await _fail(r, trace)
    if not isinstance(r.json().get("output"), str):
        trace.error = f"reply without output: {r.text[:200]}"
        return trace
    trace.end = time.perf_counter()
    return trace


async def _queue_result(client: httpx.AsyncClient, submitted: dict, poll_s: float):
    """Poll status_url until COMPLETED, then the result (the model's own status and body)."""
    status_url, response_url = submitted["status_url"], submitted["response_url"]
    while True:
        s = await client.get(status_url)
        if s.status_code not in (200, 202):
            return s
        if s.json().get("status") == "COMPLETED":
            return await client.get(response_url)
        await asyncio.sleep(poll_s)


def auth_headers(protocol: str, api_key: str | None) -> dict[str, str]:
    if not api_key:
        return {}
    return {"Authorization": f"Key {api_key}" if protocol == "fal" else f"Bearer {api_key}"}
