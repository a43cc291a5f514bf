"""OpenAI-compatible vision chat (docs/serving-protocol.md §3).

    GET  /v1/models              {"object": "list", "data": [{"id", "object": "model", ...}]}
    POST /v1/chat/completions    chat.completion, or SSE chat.completion.chunk events + [DONE]

A chat holds up to ServerSettings.max_images_per_request images (`image_url` parts of user
messages, each placed where its part stands), or none (a text-only chat). System messages,
assistant turns and several user turns are rendered with the checkpoint's chat template
(LLaVA.render_chat). `n` choices share one prefill (choices.py); `logprobs` are the raw
distribution's (before temperature and top-p). Errors: {"error": {message, type, param, code}},
400 for bad requests and image errors, 404 for an unknown model.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from .chat import parse_chat
from .errors import ApiError, detail_message, openai_error_body
from .bodies import read_json
from .safety import classify
from .stops import apply_stops
from .choices import choice_events, indexed
from .streaming import (SSE_HEADERS, ClosingStreamingResponse, chained, engine_events,
                        first_and_rest, last_snapshot)

router = APIRouter()


def _model_ids(request: Request) -> list[str]:
    return [request.app.state.endpoint_id]


@router.get("/v1/models")
async def models(request: Request):
    created = request.app.state.started_at
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created,
                                        "owned_by": "fastllava"} for m in _model_ids(request)]}


def _openai_error(exc: BaseException, budget: str = "max_tokens") -> ApiError:
    """`budget`: the field the client set the output length with (max_completion_tokens wins
    over max_tokens), named in place of the engine's max_tokens."""
    status, detail, error_type = classify(exc)
    param, code = None, error_type
    if isinstance(detail, list) and detail:
        detail = [dict(d, loc=[budget if x == "max_tokens" else x for x in d.get("loc", [])])
                  for d in detail]
        loc = [str(x) for x in detail[0].get("loc", []) if x != "body"]
        param = {"image_url": "messages", "prompt": "messages"}.get(loc[0], loc[0]) if loc else None
        # The problem's own type, as parse_chat gives it: OpenAI clients act on the code
        # ("context_length_exceeded" is what they test to trim a conversation), and the same
        # error must not change code with the stage that found it.
        code = detail[0].get("type") or error_type
    return ApiError(400 if status == 422 else status, detail_message(detail), error_type,
                    param=param, code=code)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state
    body = await read_json(request)
    chat = parse_chat(body, state.settings, _model_ids(request) + state.model_aliases)
    llava, s = state.llava, state.settings
    # No max_tokens from the client: the server's default shrinks to fit the context (vLLM's
    # rule for an unset max_tokens); one the client chose is refused when it does not fit.
    unset = body.get("max_tokens") is None and body.get("max_completion_tokens") is None
    limits = dict(max_tokens_limit=s.max_tokens_limit, max_prompt_chars=s.max_prompt_chars)
    sampling = {"logprobs": chat.logprobs, **({"stop_ids": ()} if chat.ignore_eos else {})}
    if chat.n == 1:
        events = indexed(engine_events(lambda: apply_stops(llava.stream_detailed(
            chat.request, messages=chat.messages, every_token=True, clamp_max_tokens=unset,
            logprobs=chat.logprobs, ignore_eos=chat.ignore_eos, **limits), chat.stop),
            state.metrics))
    else:
        events = choice_events(
            chat.n,
            lambda: llava.prepare_request(chat.request, messages=chat.messages,
                                          clamp_max_tokens=unset, **limits),
            lambda req, prepared: apply_stops(llava.stream_prepared(
                req, prepared, every_token=True, sampling=sampling),
                chat.stop),
            state.metrics)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), chat.model

    def finish(snap: dict) -> str:  # "stop": a stop id or a stop string (apply_stops)
        return snap.get("finish_reason") or "length"

    def logprobs(snap: dict, sent: int = 0) -> dict | None:
        """OpenAI's choice logprobs: the entries from `sent` on (None when not asked)."""
        if chat.logprobs is None:
            return None
        return {"content": snap.get("logprobs", [])[sent:], "refusal": None}

    def usage(lasts: dict[int, dict]) -> dict:
        p = next(iter(lasts.values()))["prompt_tokens"]     # one prompt, shared by the choices
        c = sum(snap["completion_tokens"] for snap in lasts.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    if not chat.stream:
        async def finals() -> AsyncIterator[dict[int, dict]]:
            lasts: dict[int, dict] = {}
            async for i, snap in events:
                lasts[i] = snap
            yield lasts

        try:  # the connection is watched from the start: a disconnect cancels the request
            lasts = await last_snapshot(request, finals())
        except ApiError:  # the client disconnected
            raise
        except Exception as e:
            raise _openai_error(e, chat.budget) from e
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": last["output"]},
                         "logprobs": logprobs(last), "finish_reason": finish(last)}
                        for i, last in sorted(lasts.items())],
            "usage": usage(lasts)})

    try:  # before any byte is sent: errors get their status code
        first, rest = await first_and_rest(events)
    except Exception as e:
        raise _openai_error(e, chat.budget) from e

    def chunk(i: int, delta: dict, finish_reason: str | None, lp: dict | None = None,
              **extra) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp,
                             "finish_reason": finish_reason}], **extra}
        if chat.include_usage:
            data.setdefault("usage", None)
        return f"data: {json.dumps(data)}\n\n"

    async def sse():
        for i in range(chat.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None)
        sent, sent_lp, lasts = [0] * chat.n, [0] * chat.n, {}
        try:
            async for i, last in chained(first, rest):
                lasts[i] = last
                text = last["output"]
                if len(text) > sent[i]:  # only the new characters are touched: O(new text)
                    yield chunk(i, {"content": text[sent[i]:]}, None, logprobs(last, sent_lp[i]))
                    sent[i], sent_lp[i] = len(text), len(last.get("logprobs", ()))
                if not last["partial"]:
                    # Tokens not yet sent (held back, or that added no text) ride on this chunk.
                    yield chunk(i, {}, finish(last), logprobs(last, sent_lp[i]))
            if chat.include_usage:
                data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": usage(lasts)}
                yield f"data: {json.dumps(data)}\n\n"
        except Exception as e:  # mid-stream: report in-band, then end the stream as usual
            err = _openai_error(e, chat.budget)
            body = openai_error_body(err.status, str(err), err.param, err.code)
            yield f"data: {json.dumps(body)}\n\n"
        finally:  # also on a client disconnect: the engine stops at its next token
            await rest.aclose()
        yield "data: [DONE]\n\n"

    return ClosingStreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)
