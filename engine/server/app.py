"""The FastAPI application: `create_app(settings, llava)`.

State shared by the routes lives on `app.state`: settings, llava, endpoint_id, store, metrics,
idempotency. The lifespan opens the job store (`open_store(settings.resolved_queue_url)`),
re-queues jobs a crashed process left running (`store.recover()`) and runs the queue worker
(`JobWorker`) until shutdown. The engine itself is loaded by the caller (the CLI) so that a bad
checkpoint fails before the server binds its port.

Routes: fal_routes (queue + run), openai_routes (/v1), and here GET /health, GET /metrics;
GET /openapi.json and GET /docs describe them all (openapi.py). At startup the lifespan logs what
was loaded and, every `stats_interval_s` while busy, a stats line (serverlog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse

from . import fal_routes, openai_routes, openapi, serverlog
from .connection import BodyTimeoutMiddleware, HeadAsGetMiddleware
from .errors import ApiError, error_response
from .jobs import IdempotencyConflict
from .metrics import Metrics
from .middleware import OPEN_PATHS, GatewayMiddleware
from .settings import DEFAULT_ENDPOINTS, ServerSettings

log = logging.getLogger("fastllava.server")


class Idempotency:
    """Submit deduplication by an `Idempotency-Key` / `x-idempotency-key` header, kept in the job
    store (so it holds across restarts and across servers sharing a queue): the same key (per
    endpoint) returns the job the first submit created while that job is stored; the same key
    with another request (path, body or webhook) is a 422 naming the conflict."""

    def submit(self, key, store, endpoint, path, data, webhook):
        try:
            return store.submit(endpoint, path, data, webhook, idempotency_key=key or None)
        except IdempotencyConflict as e:
            raise ApiError(422, [{
                "loc": ["header", "idempotency-key"],
                "msg": f"this Idempotency-Key was already used for a request with another "
                       f"{' and '.join(e.differs)}; send that same request again to get its "
                       "job, or use a new key",
                "type": "idempotency_key_reused"}], "idempotency_key_reused") from None


def default_endpoint(llava) -> str:
    return DEFAULT_ENDPOINTS.get(llava.config.kind, "fal-ai/llava-next")


def create_app(settings: ServerSettings, llava, *, store=None, run_worker: bool = True) -> FastAPI:
    """The app for one loaded model. `store`: an open JobStore (default: open_store from the
    settings at startup); run_worker=False leaves the queue to other processes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        own_store = store is None
        if own_store:
            from .stores import open_store

            app.state.store = await run_in_threadpool(open_store, settings.resolved_queue_url)
        worker = stats_task = None
        try:
            recovered = await run_in_threadpool(app.state.store.recover)
            if recovered:
                log.warning("re-queued %d job(s) left running by a previous process", recovered)
            if run_worker:
                from .worker import JobWorker

                worker = JobWorker(app.state.store, llava, metrics=app.state.metrics,
                                   webhook_secret=settings.webhook_secret,
                                   retention_s=settings.retention_s,
                                   webhook_allow_private=not settings.refuse_private_webhook_hosts,
                                   max_tokens_limit=settings.max_tokens_limit,
                                   max_prompt_chars=settings.max_prompt_chars,
                                   concurrency=settings.queue_concurrency,
                                   image_fetch_concurrency=settings.image_fetch_concurrency,
                                   webhook_concurrency=settings.webhook_concurrency)
                worker.start()
            serverlog.redact_access_log()
            serverlog.log_startup(app)
            if settings.stats_interval_s > 0:
                stats = serverlog.StatsReporter(llava, app.state.store, settings.stats_interval_s)
                stats_task = asyncio.create_task(stats.run())
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            if worker is not None:
                await run_in_threadpool(worker.stop, timeout_s=10.0)
            if own_store:
                await run_in_threadpool(app.state.store.close)

    app = FastAPI(title="fastllava", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    openapi.install(app)
    app.state.settings = settings
    app.state.llava = llava
    app.state.store = store
    app.state.metrics = Metrics()
    app.state.idempotency = Idempotency()
    app.state.endpoint_id = settings.endpoint_id or default_endpoint(llava)
    app.state.model_aliases = list(dict.fromkeys(
        [settings.model, os.path.basename(os.path.normpath(settings.model))]))
    app.state.started_at = int(time.time())

    @app.get("/health")
    async def health(request: Request):
        try:
            counts = await run_in_threadpool(request.app.state.store.counts)
        except Exception as e:  # the store is down: not healthy
            return JSONResponse({"status": "unhealthy", "detail": f"job store: {e}"}, 503)
        return {"status": "ok", "endpoint_id": app.state.endpoint_id, "queue": counts}

    @app.get("/metrics")
    async def metrics(request: Request):
        counts = await run_in_threadpool(request.app.state.store.counts)
        stats = getattr(request.app.state.llava, "stats", None)
        return PlainTextResponse(request.app.state.metrics.render(
            counts, stats() if stats is not None else None),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(openai_routes.router)
    app.include_router(fal_routes.router)

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                   include_in_schema=False)
    async def not_found(request: Request, rest: str):
        # Without this, a GET on a path that only the POST catch-all of the run API matches
        # would answer 405 instead of 404.
        raise ApiError(404, f"Not Found: {request.method} {request.url.path}", "not_found")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(request.url.path, ApiError(
            exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind,
            headers=dict(exc.headers or {})))

    @app.exception_handler(FastAPIValidationError)
    async def validation_error(request: Request, exc: FastAPIValidationError):
        detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return error_response(request.url.path, ApiError(422, detail, "validation_error"))

    open_paths = OPEN_PATHS + (("/metrics",) if settings.metrics_open else ())
    app.add_middleware(GatewayMiddleware, api_keys=settings.api_keys,
                       max_body_bytes=settings.max_body_bytes, open_paths=open_paths)
    if settings.cors_origins:
        # Added last = outermost: a browser's preflight OPTIONS is answered before auth (it never
        # carries credentials); request ids and error types stay readable by page scripts.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "PUT", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["x-fal-request-id", "x-fal-error-type"], max_age=600)
    # Outermost: the body deadline covers every reader of the body (gateway and routes).
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(HeadAsGetMiddleware)   # outside all: the gateway and routes see a GET
    return app
