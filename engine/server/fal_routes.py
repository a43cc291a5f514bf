"""fal's queue and run protocol (docs/serving-protocol.md §2) for one endpoint "owner/alias".

Queue API (fal's queue host; here the path prefix /queue, or any Host starting with "queue."):
    POST {q}/{owner}/{alias}[/{path}][?fal_webhook=URL]   submit → 200 IN_QUEUE + absolute URLs
                                                         (a path under requests/: 405)
    GET  {q}/{owner}/{alias}/requests/{id}/status[/]     202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED
    GET  {q}/{owner}/{alias}/requests/{id}/status/stream SSE of status objects, closed on COMPLETED
    GET  {q}/{owner}/{alias}/requests/{id}[/response]    the job's own status code and body
    PUT  {q}/{owner}/{alias}/requests/{id}/cancel        202 CANCELLATION_REQUESTED, 400 ALREADY_
                                                         COMPLETED, 404 NOT_FOUND
    ({q} is "/queue" or empty: status/result/cancel answer on both.)
Run API (fal's run host):
    POST /{owner}/{alias}[/{path}]      sync run → 200 {"output", "partial": false}; a client
                                        that disconnects cancels it
    POST /{owner}/{alias}/stream        SSE of cumulative {"output", "partial"} snapshots, no [DONE]
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from fastllava.schema import short_repr, validate_all

from .bodies import checked_webhook_url, is_request_id, read_json
from .errors import ApiError, detail_message, encodable
from .jobs import COMPLETED, IN_QUEUE, Job
from .safety import classify, precheck_image_url
from .streaming import (SSE_HEADERS, ClosingStreamingResponse, engine_events, first_and_rest,
                        last_snapshot)

router = APIRouter()
QUEUE = "/queue"
_LOG_KEYS = {"message": "", "level": "INFO", "source": "USER", "timestamp": None}


# ---- shared helpers ---------------------------------------------------------------------------
def validated_input(request: Request, data: Any) -> dict:
    """The fal model input checked with the server's limits; all problems in one 422."""
    s = request.app.state.settings
    errors = validate_all(data, max_tokens_limit=s.max_tokens_limit,
                          max_prompt_chars=s.max_prompt_chars,
                          check_image_url=lambda url: precheck_image_url(url, s))
    if errors:
        raise ApiError(422, [e.to_dict() for e in errors], "validation_error")
    return data


def check_endpoint(request: Request, owner: str, alias: str) -> str:
    endpoint, served = f"{owner}/{alias}", request.app.state.endpoint_id
    if endpoint != served:
        raise ApiError(404, f"unknown endpoint {endpoint!r}: this server serves {served!r}",
                       "not_found")
    return endpoint


def check_run_path(request: Request, path: str) -> None:
    """A POST to a sub-path under requests/ (e.g. requests/{id}/cancel) is a request route called
    with the wrong method, not an input for the model: a 405 naming the right one, rather than a
    new job (a client that cancels with POST would otherwise start another run)."""
    if path.strip("/").split("/", 1)[0] == "requests":
        allow = "PUT" if path.rstrip("/").endswith("/cancel") else "GET"
        raise ApiError(405, f"Method Not Allowed: {request.method} {request.url.path} (a request "
                       f"route: use {allow})", "method_not_allowed", headers={"Allow": allow})


def base_url(request: Request) -> str:
    """Where the client reached us: --public-url, else the request's scheme and Host header;
    plus the /queue prefix when the request came in under it."""
    public = request.app.state.settings.public_url
    root = public.rstrip("/") if public else (
        f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}")
    return root + (QUEUE if request.url.path.startswith(QUEUE + "/") else "")


def job_urls(request: Request, job: Job) -> dict[str, str]:
    url = f"{base_url(request)}/{job.endpoint}/requests/{job.id}"
    return {"response_url": url, "status_url": url + "/status", "cancel_url": url + "/cancel"}


async def find_job(request: Request, endpoint: str, request_id: str) -> Job | None:
    """The endpoint's job `request_id`, or None; an id not of the stores' form is not looked up."""
    if not is_request_id(request_id):
        return None
    job = await run_in_threadpool(
        functools.partial(request.app.state.store.get, request_id, with_input=False))
    return job if job is not None and job.endpoint == endpoint else None


def id_header(request_id: str) -> dict[str, str]:
    """x-fal-request-id for an answer about `request_id`: only an id of the stores' form is echoed
    (the middleware's own id goes on the others)."""
    return {"x-fal-request-id": request_id} if is_request_id(request_id) else {}


def not_found_message(request_id: str) -> str:
    why = "unknown, or its result expired" if is_request_id(request_id) else \
        "not a request id: those are 1 to 128 letters, digits, '-' or '_'"
    return f"request {short_repr(request_id)} not found ({why})"


async def get_job(request: Request, owner: str, alias: str, request_id: str) -> Job:
    job = await find_job(request, check_endpoint(request, owner, alias), request_id)
    if job is None:
        raise ApiError(404, not_found_message(request_id), "not_found",
                       headers=id_header(request_id))
    return job


def status_body(request: Request, job: Job, position: int | None, with_logs: bool) -> dict:
    body: dict[str, Any] = {"status": job.status, "request_id": job.id, **job_urls(request, job),
                            "logs": [{**_LOG_KEYS, **item} for item in job.logs] if with_logs
                            else None}
    if job.status == IN_QUEUE:
        body["queue_position"] = position or 0
    if job.status == COMPLETED:
        took = (job.finished_at - job.started_at) if job.finished_at and job.started_at else 0.0
        body["metrics"] = {"inference_time": took}
        if job.error:
            body["error"] = detail_message(job.error.get("detail"))
            body["error_type"] = job.error.get("error_type")
    return body


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


# ---- queue API --------------------------------------------------------------------------------
@router.post(QUEUE + "/{owner}/{alias}")
@router.post(QUEUE + "/{owner}/{alias}/{path:path}")
async def submit(request: Request, owner: str, alias: str, path: str = ""):
    endpoint = check_endpoint(request, owner, alias)
    check_run_path(request, path)
    data = validated_input(request, await read_json(request))
    webhook = request.query_params.get("fal_webhook")
    if webhook is not None:
        checked_webhook_url(webhook)
    state = request.app.state
    key = request.headers.get("idempotency-key") or request.headers.get("x-idempotency-key")
    job = await run_in_threadpool(state.idempotency.submit, key, state.store, endpoint,
                                  path.strip("/"), data, webhook)
    position = await run_in_threadpool(state.store.queue_position, job.id)
    body = {"status": job.status, "request_id": job.id, **job_urls(request, job),
            "queue_position": position or 0}
    if webhook is not None:
        body["gateway_request_id"] = job.id
    return JSONResponse(body, headers={"x-fal-request-id": job.id})


@router.get("/{owner}/{alias}/requests/{request_id}/status")
@router.get("/{owner}/{alias}/requests/{request_id}/status/")
@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}/status")
@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}/status/")
async def status(request: Request, owner: str, alias: str, request_id: str):
    job = await get_job(request, owner, alias, request_id)
    position = await run_in_threadpool(request.app.state.store.queue_position, job.id)
    body = status_body(request, job, position, _truthy(request.query_params.get("logs")))
    return JSONResponse(body, 200 if job.status == COMPLETED else 202,
                        headers={"x-fal-request-id": job.id})


@router.get("/{owner}/{alias}/requests/{request_id}/status/stream")
@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}/status/stream")
async def status_stream(request: Request, owner: str, alias: str, request_id: str):
    job = await get_job(request, owner, alias, request_id)
    store, ping_s = request.app.state.store, request.app.state.settings.sse_ping_s
    with_logs = _truthy(request.query_params.get("logs"))

    async def events():
        last, last_sent, current = None, time.monotonic(), job
        while True:
            position = await run_in_threadpool(store.queue_position, current.id)
            body = status_body(request, current, position, with_logs)
            key = (current.status, position, len(current.logs) if with_logs else 0)
            if key != last:
                last, last_sent = key, time.monotonic()
                yield f"data: {json.dumps(body)}\n\n"
            elif time.monotonic() - last_sent >= ping_s:
                last_sent = time.monotonic()
                yield ": ping\n\n"
            if current.status == COMPLETED:
                return
            await asyncio.sleep(0.1)
            current = await run_in_threadpool(
                functools.partial(store.get, job.id, with_input=False)) or current

    return ClosingStreamingResponse(events(), media_type="text/event-stream",
                                    headers={**SSE_HEADERS, "x-fal-request-id": job.id})


@router.get("/{owner}/{alias}/requests/{request_id}")
@router.get("/{owner}/{alias}/requests/{request_id}/response")
@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}")
@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}/response")
async def result(request: Request, owner: str, alias: str, request_id: str):
    job = await get_job(request, owner, alias, request_id)
    headers = {"x-fal-request-id": job.id}
    if job.status != COMPLETED:
        raise ApiError(400, f"request {job.id!r} is still in progress (status {job.status})",
                       "request_not_completed", headers=headers)
    if job.error:
        error_type = job.error.get("error_type", "internal_error")
        body = encodable({"detail": job.error.get("detail"), "error_type": error_type})
        return JSONResponse(body, int(job.error.get("status_code", 500)),
                            headers={**headers, "X-Fal-Error-Type": error_type})
    return JSONResponse(job.result, headers=headers)


@router.put("/{owner}/{alias}/requests/{request_id}/cancel")
@router.put(QUEUE + "/{owner}/{alias}/requests/{request_id}/cancel")
async def cancel(request: Request, owner: str, alias: str, request_id: str):
    job = await find_job(request, check_endpoint(request, owner, alias), request_id)
    headers = id_header(request_id)
    outcome = "NOT_FOUND" if job is None else \
        await run_in_threadpool(request.app.state.store.request_cancel, request_id)
    if outcome == "NOT_FOUND":
        return JSONResponse(encodable({"status": outcome, "detail": not_found_message(request_id),
                                       "error_type": "not_found"}), 404, headers=headers)
    if outcome == "ALREADY_COMPLETED":
        return JSONResponse({"status": outcome, "detail": f"request {request_id!r} has already "
                             "completed", "error_type": "bad_request"}, 400, headers=headers)
    return JSONResponse({"status": outcome}, 202, headers=headers)


# ---- run API ----------------------------------------------------------------------------------
def _engine(request: Request, data: dict):
    state = request.app.state
    s = state.settings
    return engine_events(lambda: state.llava.stream_detailed(
        data, max_tokens_limit=s.max_tokens_limit, max_prompt_chars=s.max_prompt_chars,
        every_token=True),
        state.metrics)


def _raise_classified(exc: BaseException) -> None:
    status_code, detail, error_type = classify(exc)
    raise ApiError(status_code, detail, error_type) from exc


@router.post("/{owner}/{alias}/stream")
async def stream(request: Request, owner: str, alias: str):
    if request.headers.get("host", "").startswith("queue."):
        return await submit(request, owner, alias, "stream")
    check_endpoint(request, owner, alias)
    events = _engine(request, validated_input(request, await read_json(request)))
    try:
        first, rest = await first_and_rest(events)
    except Exception as e:  # before any byte is sent: a proper status code
        _raise_classified(e)

    async def sse():
        try:
            if first is not None:
                yield f"data: {json.dumps({'output': first['output'], 'partial': first['partial']})}\n\n"
            async for snap in rest:
                yield f"data: {json.dumps({'output': snap['output'], 'partial': snap['partial']})}\n\n"
        except Exception as e:  # mid-stream: the status is sent already; report in-band
            _, detail, error_type = classify(e)
            yield f"data: {json.dumps({'detail': detail, 'error_type': error_type})}\n\n"
        finally:
            await rest.aclose()

    return ClosingStreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/{owner}/{alias}")
@router.post("/{owner}/{alias}/{path:path}")
async def run(request: Request, owner: str, alias: str, path: str = ""):
    if request.headers.get("host", "").startswith("queue."):
        return await submit(request, owner, alias, path)
    check_endpoint(request, owner, alias)
    check_run_path(request, path)
    events = _engine(request, validated_input(request, await read_json(request)))
    try:
        final = await last_snapshot(request, events)  # a disconnect cancels the request
    except ApiError:
        raise
    except Exception as e:
        _raise_classified(e)
    return JSONResponse({"output": final["output"], "partial": False})
