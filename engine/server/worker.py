"""`JobWorker`: runs queued jobs on the engine from `concurrency` background threads, so up to
that many queued jobs share the engine's continuous batches.

    worker = JobWorker(store, llava, metrics=m, webhook_secret="s")
    worker.start()            # after store.recover() at server start
    ...
    worker.stop(timeout_s=10)

Per job: claim (a lease on the job) → log "starting" → validate the input again and open the
engine stream (the image is fetched at the first snapshot, under the engine's ImageLimits) →
iterate the cumulative snapshots, polling the store's cancel flag at most every cancel_poll_s →
log "done in X s" → complete(result | error) → metrics.record(ttft, latency, tokens, ok) → a
webhook if the job has one. Errors map as the HTTP layer maps them (safety.classify):
validation / image errors 422, other ValueErrors 400, anything else 500 "internal_error" (the
traceback goes to the server log, never to the client); a cancel gives 499 "client_cancelled".
A failing job, or a failing store call, never ends the worker thread.

A second thread heartbeats every heartbeat_s (keeping this worker's leases alive), calls
store.recover() (taking back jobs of dead workers, in this process or another one sharing the
queue) and, every purge_interval_s, store.purge_expired(retention_s).

stop(): the jobs running at that moment are interrupted at their next snapshot and released to the
queue unfinished (IN_QUEUE at its original place, the attempt not counted), so a restarted or a
sibling server re-runs it at once; nothing is half-completed. If the thread cannot be joined in
time (an image fetch in flight), the lease/crash recovery of the store re-queues the job later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from .jobs import Job, JobStore, cancelled_error, job_error
from .safety import classify
from .webhooks import WebhookSender

log = logging.getLogger("fastllava.worker")


class _Cancelled(Exception):
    pass


class JobWorker:
    def __init__(self, store: JobStore, llava, *, metrics=None, webhook_secret: str | None = None,
                 webhook_max_attempts: int = 5, retention_s: float = 3600.0,
                 worker_id: str | None = None, webhook_allow_private: bool = True,
                 webhook_base_delay_s: float = 1.0, max_tokens_limit: int = 4096,
                 max_prompt_chars: int = 16384, heartbeat_s: float | None = None,
                 purge_interval_s: float = 60.0, claim_timeout_s: float = 0.5,
                 cancel_poll_s: float = 0.1, concurrency: int = 1, webhook_concurrency: int = 8):
        """worker_id None → "<host>-<pid>-<random>": unique per process, so a restarted server
        never mistakes its predecessor's jobs for its own. heartbeat_s None → a quarter of the
        store's lease_s. max_tokens_limit / max_prompt_chars: the server's request limits (the
        input was validated with them at submit; the worker validates again). concurrency: jobs
        run at once (one thread each; the store's claim is atomic across threads)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
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
        self._threads: list[threading.Thread] = []
        self.current_job_ids: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError(f"worker {self.worker_id} was already started")
        self.store.heartbeat(self.worker_id)     # registered before the first claim
        targets = [(f"jobs-{i}", self._run) for i in range(self.concurrency)]
        for name, target in targets + [("heartbeat", self._beat)]:
            t = threading.Thread(target=target, name=f"fastllava-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.webhooks.start()   # also resumes deliveries left pending by an earlier process

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop both threads (see the module docstring for the running job); flush pending
        webhooks for what is left of timeout_s (2 s at most). True if the threads ended."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.webhooks.wait_idle(max(0.0, min(2.0, deadline - time.monotonic())))
        self.webhooks.close(timeout_s=max(0.1, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # ---- threads ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim(self.worker_id, self.claim_timeout_s)
            except Exception:
                log.exception("worker %s: claim failed; retrying", self.worker_id)
                self._stop.wait(1.0)
                continue
            if job is None:
                continue
            self.current_job_ids.add(job.id)
            try:
                self._process(job)
            except Exception:   # a store failure mid-job: hand the job back for another try
                log.exception("worker %s: job %s could not be finished", self.worker_id, job.id)
                with contextlib.suppress(Exception):
                    self.store.release(job.id, self.worker_id)
            finally:
                self.current_job_ids.discard(job.id)

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

    # ---- one job ---------------------------------------------------------------------------------
    def _open(self, request: dict[str, Any]) -> Iterator[dict]:
        """The engine's snapshot stream; validation errors raise here, before any work."""
        # One snapshot per token, so a cancel is honoured at the next token.
        return self.llava.stream_detailed(request, every_token=True, **self.limits)

    def _process(self, job: Job) -> None:
        store, t0 = self.store, time.monotonic()
        ttft, tokens, last, result, error = None, 0, None, None, None
        store.append_log(job.id, f"starting (attempt {job.attempts}) on worker {self.worker_id}")
        try:
            if job.cancel_requested:
                raise _Cancelled
            events = self._open(job.input)
            store.append_log(job.id, "loading the image and generating")
            checked = time.monotonic()
            with contextlib.closing(events):        # closing frees the request's KV pages
                for last in events:
                    now = time.monotonic()
                    if ttft is None:
                        ttft = now - t0
                        store.append_log(job.id, f"first output after {ttft:.3f} s")
                    tokens = last.get("completion_tokens", tokens + 1)
                    if now - checked >= self.cancel_poll_s:
                        checked = now
                        if self._stop.is_set():
                            break
                        if self.store.cancel_requested(job.id):
                            raise _Cancelled
            if self._stop.is_set() and (last is None or last["partial"]):
                store.release(job.id, self.worker_id)
                log.info("worker %s stopping: job %s returned to the queue", self.worker_id, job.id)
                return
            result = {"output": last["output"], "partial": False}
        except _Cancelled:
            error = cancelled_error()
        except Exception as e:
            error = job_error(*classify(e))
            if error["status_code"] >= 500:
                log.exception("job %s failed", job.id)
        latency = time.monotonic() - t0
        if error is None:
            final = (f"done in {latency:.3f} s ({tokens} tokens)", "INFO")
        elif error["error_type"] == "client_cancelled":
            final = (f"cancelled after {latency:.3f} s", "INFO")
        else:
            final = (f"failed with {error['status_code']} {error['error_type']}: "
                     f"{_summary(error['detail'])}", "ERROR")
        finished = store.complete(job.id, result=result, error=error, log=final)
        if self.metrics is not None:
            self.metrics.record(ttft, latency, tokens, error is None)
        if finished and job.webhook_url:   # complete() queued its delivery in the store
            self.webhooks.wake()


def _summary(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)
