"""The OpenAPI document (/openapi.json, rendered at /docs): every route with its real request
body, answers and status codes.

The handlers read raw requests (their own strict parsing, fal's and OpenAI's error shapes), so
FastAPI's generated document would have no bodies. `install(app)` replaces `app.openapi` with
one that takes FastAPI's document (paths, parameters) and fills each operation from OPERATIONS,
with the pydantic models of openapi_models.py as components. A route with no entry in OPERATIONS is an
error here, not a silently empty operation.
"""

from __future__ import annotations

import dataclasses
import re

from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from fastllava.cli import _version

from . import openapi_models

REF = "#/components/schemas/{model}"
JSON, SSE = "application/json", "text/event-stream"


@dataclasses.dataclass(frozen=True)
class Op:
    tag: str
    summary: str
    body: str | None                        # component name of the JSON request body
    answers: dict[int, tuple[str, str]]     # status → (description, component name)
    sse: str | None = None                  # component of each SSE event of the 200 answer
    text_200: bool = False                  # 200 is text/plain (Prometheus)
    open: bool = False                      # never needs an API key


_AUTH = {401: ("missing or invalid API key (only when the server has keys)", "FalError")}
_OAUTH = {401: ("missing or invalid API key (only when the server has keys)", "OpenAIError")}
_NOT_FOUND = {404: ("unknown endpoint id, or unknown / expired request id", "FalError")}
_INPUT = {413: ("body over --max-body-bytes", "FalError"),
          422: ("invalid input, all problems at once; image fetch/decode errors",
                "FalValidationError")}
_ENGINE = {400: ("the engine refused the request (e.g. prompt too long for the context)",
                 "FalError"),
           500: ("internal error (never a traceback)", "FalError")}

OPERATIONS: list[tuple[str, str, Op]] = [  # (method, path pattern, operation); first match wins
    ("get", "/health", Op("server", "Liveness and queue counts (no auth)", None, {
        200: ("healthy", "Health"), 503: ("the job store is unreachable", "Unhealthy")},
        open=True)),
    ("get", "/metrics", Op("server", "Prometheus metrics (no auth with --metrics-open)", None,
                           {200: ("text exposition format 0.0.4", ""), **_AUTH}, text_200=True)),
    ("get", "/v1/models", Op("OpenAI", "The served model (its id is the endpoint id)", None, {
        200: ("the model list", "ModelList"), **_OAUTH})),
    ("post", "/v1/chat/completions", Op(
        "OpenAI", "Vision chat completion (one image); SSE chunks with stream=true",
        "ChatCompletionRequest", {
            200: ("a chat.completion, or with stream=true SSE chat.completion.chunk events then "
                  "`data: [DONE]`", "ChatCompletion"),
            400: ("invalid request or image error", "OpenAIError"), **_OAUTH,
            404: ("unknown model", "OpenAIError"),
            413: ("body over --max-body-bytes", "OpenAIError"),
            500: ("internal error", "OpenAIError")}, sse="ChatCompletionChunk")),
    ("post", "/queue/{owner}/{alias}(/{path})?", Op(
        "fal queue", "Submit a job (?fal_webhook=URL; Idempotency-Key header dedupes retries)",
        "FalInput", {200: ("queued", "QueueSubmitted"), **_AUTH, **_NOT_FOUND, **_INPUT})),
    ("get", "(/queue)?/{owner}/{alias}/requests/{request_id}/status/stream", Op(
        "fal queue", "SSE of status objects until COMPLETED (?logs=1)", None,
        {200: ("status events; `: ping` comments keep the stream alive", "QueueStatus"),
         **_AUTH, **_NOT_FOUND}, sse="QueueStatus")),
    ("get", "(/queue)?/{owner}/{alias}/requests/{request_id}/status/?", Op(
        "fal queue", "Job status (?logs=1 for the job's log lines)", None, {
            200: ("COMPLETED (with metrics; error and error_type if it failed)", "QueueStatus"),
            202: ("IN_QUEUE (with queue_position) or IN_PROGRESS", "QueueStatus"),
            **_AUTH, **_NOT_FOUND})),
    ("put", "(/queue)?/{owner}/{alias}/requests/{request_id}/cancel", Op(
        "fal queue", "Cancel a job (queued: dropped; running: stops at its next token)", None, {
            202: ("CANCELLATION_REQUESTED", "CancelAnswer"),
            400: ("ALREADY_COMPLETED", "CancelAnswer"),
            **_AUTH, 404: ("NOT_FOUND", "CancelAnswer")})),
    ("get", "(/queue)?/{owner}/{alias}/requests/{request_id}(/response)?", Op(
        "fal queue", "The job's result: its own status code and body", None, {
            200: ("the output", "FalOutput"),
            400: ("request_not_completed (still running), or the job's bad_request", "FalError"),
            **_AUTH, **_NOT_FOUND,
            422: ("the job's input or image was invalid", "FalValidationError"),
            499: ("client_cancelled: the job was cancelled", "FalError"),
            500: ("the job failed (internal_error)", "FalError")})),
    ("post", "/{owner}/{alias}/stream", Op(
        "fal run", "Stream cumulative snapshots (SSE, no [DONE])", "FalInput", {
            200: ("events {output: text so far, partial: true} ..., then partial: false; an "
                  "error after the start is an in-band {detail, error_type} event", "FalOutput"),
            **_AUTH, **_NOT_FOUND, **_INPUT, **_ENGINE}, sse="FalOutput")),
    ("post", "/{owner}/{alias}(/{path})?", Op(
        "fal run", "Synchronous run (a Host starting with queue. submits instead)", "FalInput", {
            200: ("the output", "FalOutput"), **_AUTH, **_NOT_FOUND, **_INPUT, **_ENGINE})),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\{(\w+)\}", r"\\{\1\\}", template))


_COMPILED = [(method, _pattern(path), op) for method, path, op in OPERATIONS]


def operation_for(method: str, path: str) -> Op:
    for m, pattern, op in _COMPILED:
        if m == method and pattern.fullmatch(path):
            return op
    raise KeyError(f"route {method.upper()} {path} has no entry in openapi.OPERATIONS")


def _content(name: str, sse: str | None = None, text: bool = False) -> dict:
    if text:
        return {"text/plain": {"schema": {"type": "string"}}}
    content = {JSON: {"schema": {"$ref": REF.format(model=name)}}} if name else {}
    if sse:
        # OpenAPI 3.1 cannot type single SSE events: the event schema goes in an extension.
        content[SSE] = {"schema": {"type": "string", "description": f"`data: <{sse} JSON>` events"},
                        "x-event-schema": {"$ref": REF.format(model=sse)}}
    return content


def _fill(op_doc: dict, op: Op, secured: bool) -> None:
    op_doc.update(tags=[op.tag], summary=op.summary)
    if op.body:
        op_doc["requestBody"] = {"required": True, "content": {
            JSON: {"schema": {"$ref": REF.format(model=op.body)}}}}
    answers = {}
    for status, (description, name) in sorted(op.answers.items()):
        if op.open and status == 401:
            continue
        is_200 = status == 200
        body = _content(name, op.sse if is_200 and op.sse else None, op.text_200 and is_200)
        if is_200 and op.sse and op.tag == "fal run":  # the stream route answers SSE only
            body.pop(JSON)
        answers[str(status)] = {"description": description, **({"content": body} if body else {})}
    op_doc["responses"] = answers
    if secured and not op.open:
        op_doc["security"] = [{"ApiKey": []}]


def build_openapi(app) -> dict:
    """The document for `app` (its routes and its settings' limits)."""
    s = app.state.settings
    doc = get_openapi(title="fastllava", version=_version(), routes=app.routes,
                      description=f"LLaVA served as fal endpoint `{app.state.endpoint_id}` "
                      "(queue + run protocol) and as an OpenAI-compatible chat model.")
    fal_input = openapi_models.fal_input_model(s.max_tokens_limit, s.max_prompt_chars)
    models = [fal_input, openapi_models.ChatCompletionRequest, *openapi_models.RESPONSE_MODELS]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    doc["components"] = {"schemas": defs["$defs"]}  # FastAPI's unused 422 models are dropped
    secured = bool(s.api_keys)
    if secured:
        doc["components"]["securitySchemes"] = {"ApiKey": {
            "type": "apiKey", "in": "header", "name": "Authorization",
            "description": "`Key <api key>` (fal) or `Bearer <api key>` (OpenAI)"}}
    metrics_open = s.metrics_open
    for path, methods in doc["paths"].items():
        for method, op_doc in methods.items():
            op = operation_for(method, path)
            if path == "/metrics" and metrics_open:
                op = dataclasses.replace(op, open=True)
            _fill(op_doc, op, secured)
    return doc


def install(app) -> None:
    """Serve build_openapi(app) at app.openapi_url (built once, on first request)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi


