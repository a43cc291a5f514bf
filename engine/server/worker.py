"""`JobWorker`: runs queued jobs on the engine. Images are fetched and decoded BEFORE a job takes
an engine slot, in a bounded pool of their own, so jobs whose images are ready run while slow
image hosts keep only fetch threads waiting.

    worker = JobWorker(store, llava, metrics=m, webhook_secret="s", concurrency=16,
                       image_fetch_concurrency=32)
    worker.start()            # after store.recover() at server start
    ...
    worker.stop(timeout_s=10)

Threads: one claimer, `image_fetch_concurrency` image threads, `concurrency` engine threads, one
heartbeat. Per job: the claimer claims it (a lease on the job) when fewer than
`image_fetch_concurrency` images are loading AND an engine slot is free once the jobs whose image
is loaded, or has been loading for less than a second, are counted (so a job waiting for the engine
stays IN_QUEUE, with its queue position and free for a sibling server, while a slow image holds no
engine slot) → an image thread logs "starting", validates the input again and prepares it (fetches
the image under the engine's ImageLimits, preprocesses it, tokenizes) → a free engine thread takes
it, checks the cancel flag, opens the engine stream, iterates the cumulative snapshots polling the
store's cancel flag at most every cancel_poll_s → log "done in X s" → complete(result | error) →
metrics.record(ttft, latency, tokens, ok) → a webhook if the job has one. An input or image error
completes the job from the image thread without ever taking an engine slot. Errors map as the HTTP
layer maps them (safety.classify): validation / image errors 422, other ValueErrors 400, anything
else 500 "internal_error" (the traceback goes to the server log, never to the client); a cancel
gives 499 "client_cancelled". A failing job, or a failing store call, never ends a worker thread.

The heartbeat thread heartbeats every heartbeat_s (keeping this worker's leases alive), calls
store.recover() (taking back jobs of dead workers, in this process or another one sharing the
queue) and, every purge_interval_s, store.purge_expired(retention_s).

stop(): the claimer stops first, and nothing is claimed after that; jobs not yet on the engine
(image loading, or ready and waiting) are released to the queue at once, and running jobs are
interrupted at their next snapshot and released: each exactly once, IN_QUEUE at its original
place, the attempt not counted, so a restarted or a sibling server re-runs it; nothing is
half-completed. A release waits until the claimer has ended, so this worker can never claim back
a job it has just returned. An image fetch still in flight is abandoned (its thread is a daemon
and drops the result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

from fastllava.schema import parse_request

from .jobs import Job, JobStore, cancelled_error, job_error
from .safety import classify
from .webhooks import WebhookSender

log = logging.getLogger("fastllava.worker")


# An image still loading after this long no longer reserves an engine slot, so the claimer takes
# the next job: a data URI or a healthy host delivers well within it, a slow host does not.
_SLOW_LOAD_S = 1.0


class _Cancelled(Exception):
    pass


@dataclasses.dataclass
class _Claimed:
    """A claimed job on its way to the engine."""
    job: Job
    t0: float                       # monotonic claim time (latency and ttft count from here)
    request: Any = None             # GenerationRequest, once validated
    prepared: Any = None            # PreparedPrompt, once the image is loaded
    loaded: bool = False            # counted in _loaded (else in _loading) while waiting


class JobWorker:
    def __init__(self, store: JobStore, llava, *, metrics=None, webhook_secret: str | None = None,
                 webhook_max_attempts: int = 5, retention_s: float = 3600.0,
                 worker_id: str | None = None, webhook_allow_private: bool = True,
                 webhook_base_delay_s: float = 1.0, max_tokens_limit: int = 4096,
                 max_prompt_chars: int = 16384, heartbeat_s: float | None = None,
                 purge_interval_s: float = 60.0, claim_timeout_s: float = 0.5,
                 cancel_poll_s: float = 0.1, concurrency: int = 1,
                 image_fetch_concurrency: int = 32, webhook_concurrency: int = 8):
        """worker_id None → "<host>-<pid>-<random>": unique per process, so a restarted server
        never mistakes its predecessor's jobs for its own. heartbeat_s None → a quarter of the
        store's lease_s. max_tokens_limit / max_prompt_chars: the server's request limits (the
        input was validated with them at submit; the worker validates again). concurrency: jobs
        run on the engine at once (one thread each). image_fetch_concurrency: claimed jobs that
        may be loading their image or waiting, image loaded, for an engine thread."""
        for name, value in (("concurrency", concurrency),
                            ("image_fetch_concurrency", image_fetch_concurrency)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.concurrency, self.image_fetch_concurrency = concurrency, image_fetch_concurrency
        self.store, self.llava, self.metrics = store, llava, metrics
        self.retention_s, self.purge_interval_s = retention_s, purge_interval_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lease_s = getattr(store, "lease_s", 10.0)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, lease_s / 4)
        self.claim_timeout_s, self.cancel_poll_s = claim_timeout_s, cancel_poll_s
        self.limits = {"max_tokens_limit": max_tokens_limit, "max_prompt_chars": max_prompt_chars}
        self.webhooks = WebhookSender(store, webhook_secret, webhook_max_attempts,
                                      webhook_base_delay_s, allow_private=webhook_allow_private,
                                      concurrency=webhook_concurrency)
        self._stop = threading.Event()
        self._claiming_over = threading.Event()     # set when the claimer has ended for good
        self._to_load: queue.SimpleQueue = queue.SimpleQueue()    # claimer → image threads
        self._ready: queue.SimpleQueue = queue.SimpleQueue()      # image threads → engine threads
        self._lock = threading.Condition()          # guards _waiting and the three counts
        self._waiting: dict[str, _Claimed] = {}     # claimed, not on the engine yet
        self._loading: dict[str, float] = {}        # job id → claim time, image loading
        self._loaded = self._running = 0            # jobs loaded and waiting / on the engine
        self._threads: list[threading.Thread] = []     # joined by stop()
        self._loaders: list[threading.Thread] = []     # may sit in an image fetch: not joined
        self.current_job_ids: set[str] = set()         # jobs on the engine now

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError(f"worker {self.worker_id} was already started")
        self.store.heartbeat(self.worker_id)     # registered before the first claim
        joined = [("claim", self._claim_loop), ("heartbeat", self._beat)]
        joined += [(f"jobs-{i}", self._engine_loop) for i in range(self.concurrency)]
        loaders = [(f"image-{i}", self._image_loop) for i in range(self.image_fetch_concurrency)]
        for group, targets in ((self._threads, joined), (self._loaders, loaders)):
            for name, target in targets:
                t = threading.Thread(target=target, name=f"fastllava-{name}", daemon=True)
                t.start()
                group.append(t)
        self.webhooks.start()   # also resumes deliveries left pending by an earlier process

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the threads (see the module docstring for the jobs they hold); flush pending
        webhooks for what is left of timeout_s (2 s at most). True if the threads ended."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._threads:
            self._threads[0].join(max(0.0, deadline - time.monotonic()))    # the claimer
        if self._claiming_over.is_set():
            with self._lock:
                pending, self._waiting = list(self._waiting.values()), {}
            for item in pending:
                self._release(item.job)
        # else: the claimer is stuck in the store; the store's lease recovery re-queues the jobs
        for _ in self._loaders:
            self._to_load.put(None)
        for _ in range(self.concurrency):
            self._ready.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.webhooks.wait_idle(max(0.0, min(2.0, deadline - time.monotonic())))
        self.webhooks.close(timeout_s=max(0.1, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _release(self, job: Job) -> None:
        """Hand a job back to the queue (stop): once the claimer is gone, so it stays there."""
        self._claiming_over.wait()
        try:
            self.store.release(job.id, self.worker_id)
        except Exception:
            log.exception("worker %s: job %s could not be returned to the queue", self.worker_id,
                          job.id)
            return
        log.info("worker %s stopping: job %s returned to the queue", self.worker_id, job.id)

    # ---- threads ---------------------------------------------------------------------------------
    def _may_claim(self) -> bool:
        """(under _lock) An image slot is free, and so is an engine slot once the jobs whose
        image is loaded and those loading for less than _SLOW_LOAD_S are counted: a job is
        claimed only when it could run as soon as its image is in, so jobs waiting for the
        engine stay IN_QUEUE (with a queue position, free for a sibling server), while a slow
        image stops holding an engine slot after _SLOW_LOAD_S."""
        now = time.monotonic()
        young = sum(now - t < _SLOW_LOAD_S for t in self._loading.values())
        return (len(self._loading) < self.image_fetch_concurrency
                and self._loaded + self._running + young < self.concurrency)

    def _claim_loop(self) -> None:
        """Claim a job whenever _may_claim; never after stop() began."""
        try:
            while not self._stop.is_set():
                with self._lock:
                    if not self._lock.wait_for(self._may_claim, self.claim_timeout_s):
                        continue
                    self._loading[""] = time.monotonic()    # reserved while the claim runs
                try:
                    job = self.store.claim(self.worker_id, self.claim_timeout_s)
                except Exception:
                    log.exception("worker %s: claim failed; retrying", self.worker_id)
                    job = None
                    self._stop.wait(1.0)
                with self._lock:
                    since = self._loading.pop("")
                    if job is None:
                        self._lock.notify_all()
                        continue
                    self._loading[job.id] = since
                    item = _Claimed(job, time.monotonic())
                    self._waiting[job.id] = item    # a stop() from now on releases it
                self._to_load.put(item)
        finally:
            self._claiming_over.set()

    def _take(self, item: _Claimed, *, start: bool = False) -> bool:
        """Take `item` out of the waiting set for this thread to finish; False if stop() has
        released it. start=True (it goes onto the engine) is refused once stop() began."""
        with self._lock:
            if item.job.id not in self._waiting or (start and self._stop.is_set()):
                return False
            del self._waiting[item.job.id]
            if item.loaded:
                self._loaded -= 1
            else:
                del self._loading[item.job.id]
            self._running += start
            self._lock.notify_all()
        return True

    def _done_running(self) -> None:
        with self._lock:
            self._running -= 1
            self._lock.notify_all()

    def _image_loop(self) -> None:
        while (item := self._to_load.get()) is not None:
            job, error = item.job, None
            with self._lock:
                if job.id not in self._waiting:
                    continue                # stop() has returned it to the queue already
            try:
                self.store.append_log(job.id, f"starting (attempt {job.attempts}) on worker "
                                              f"{self.worker_id}")
            except Exception:
                if self._take(item):
                    self._give_back(job)
                continue
            try:
                item.request = parse_request(job.input, **self.limits)
                item.prepared = self.llava.prepare(item.request)
            except Exception as e:
                error = e
            if error is None:
                with self._lock:
                    if job.id not in self._waiting:
                        continue            # stop() has returned it to the queue meanwhile
                    del self._loading[job.id]
                    self._loaded, item.loaded = self._loaded + 1, True
                    self._lock.notify_all()
                self._ready.put(item)
            elif self._take(item):
                self._guard(item, self._finish, item, None, 0, None, _error(job, error))

    def _engine_loop(self) -> None:
        while (item := self._ready.get()) is not None:
            if not self._take(item, start=True):
                continue      # released by stop(), or left for stop() to release
            self.current_job_ids.add(item.job.id)
            try:
                self._guard(item, self._generate, item)
            finally:
                self.current_job_ids.discard(item.job.id)
                self._done_running()

    def _guard(self, item: _Claimed, call, *args) -> None:
        try:
            call(*args)
        except Exception:
            self._give_back(item.job)

    def _give_back(self, job: Job) -> None:
        """A store call failed mid-job: hand the job back for another try."""
        log.exception("worker %s: job %s could not be finished", self.worker_id, job.id)
        with contextlib.suppress(Exception):
            self.store.release(job.id, self.worker_id)

    def _beat(self) -> None:
        next_purge = time.monotonic()
        while True:
            for name, call in (("heartbeat", lambda: self.store.heartbeat(self.worker_id)),
                               ("recover", self.store.recover)):
                try:
                    call()
                except Exception:
                    log.exception("worker %s: %s failed", self.worker_id, name)
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_interval_s
                try:
                    self.store.purge_expired(self.retention_s)
                except Exception:
                    log.exception("worker %s: purge_expired failed", self.worker_id)
            if self._stop.wait(self.heartbeat_s):
                return

    # ---- one job on the engine -------------------------------------------------------------------
    def _generate(self, item: _Claimed) -> None:
        job, store = item.job, self.store
        ttft, tokens, last, result, error = None, 0, None, None, None
        try:
            if job.cancel_requested or store.cancel_requested(job.id):
                raise _Cancelled
            store.append_log(job.id, "image loaded; generating")
            events = self.llava.stream_prepared(item.request, item.prepared, every_token=True)
            checked = time.monotonic()
            with contextlib.closing(events):        # closing frees the request's KV pages
                for last in events:
                    now = time.monotonic()
                    if ttft is None:
                        ttft = now - item.t0
                        store.append_log(job.id, f"first output after {ttft:.3f} s")
                    tokens = last.get("completion_tokens", tokens + 1)
                    if now - checked >= self.cancel_poll_s:
                        checked = now
                        if self._stop.is_set():
                            break
                        if store.cancel_requested(job.id):
                            raise _Cancelled
            if self._stop.is_set() and (last is None or last["partial"]):
                self._release(job)
                return
            result = {"output": last["output"], "partial": False}
        except _Cancelled:
            error = cancelled_error()
        except Exception as e:
            error = _error(job, e)
        self._finish(item, ttft, tokens, result, error)

    def _finish(self, item: _Claimed, ttft: float | None, tokens: int,
                result: dict | None, error: dict | None) -> None:
        job, latency = item.job, time.monotonic() - item.t0
        if error is None:
            final = (f"done in {latency:.3f} s ({tokens} tokens)", "INFO")
        elif error["error_type"] == "client_cancelled":
            final = (f"cancelled after {latency:.3f} s", "INFO")
        else:
            final = (f"failed with {error['status_code']} {error['error_type']}: "
                     f"{_summary(error['detail'])}", "ERROR")
        finished = self.store.complete(job.id, result=result, error=error, log=final)
        if self.metrics is not None:
            self.metrics.record(ttft, latency, tokens, error is None)
        if finished and job.webhook_url:   # complete() queued its delivery in the store
            self.webhooks.wake()


def _error(job: Job, exc: Exception) -> dict[str, Any]:
    error = job_error(*classify(exc))
    if error["status_code"] >= 500:
        log.error("job %s failed", job.id, exc_info=exc)
    return error


def _summary(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)
