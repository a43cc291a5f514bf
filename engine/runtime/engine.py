"""The engine loop: one background thread owns the scheduler, the block manager and the model
runner; callers on any thread (or an asyncio loop) submit requests and receive events.

    schedule → run (one forward + on-device sampling) → update → deliver events → repeat

New requests and cancellations arrive through a queue and are applied between steps, so a request
joins the running batch at the next step (continuous batching).

With `overlap=True` (RuntimeConfig.overlap_scheduling) the loop keeps one step in flight:

    schedule N+1 → launch N+1 → wait for N's ids → update N, deliver N → repeat

Step N+1 is scheduled and packed while step N runs on the device; a sequence that samples in step
N decodes in step N+1 from a placeholder the runner resolves on the device (scheduler.advance).
Stop decisions therefore lag one step: a sequence that stops at N has already been given step
N+1, whose token is discarded (scheduler.resolve). Tokens are the serial loop's exactly: the
sampler's noise depends on (seed, step index, vocab id) only, and every step sees the same KV. A request's events go to its
`RequestHandle`: ("token", id) for every sampled token, then exactly one of ("finish", reason) or
("error", exception). A failing step fails only the requests in it; the loop goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch

from fastllava.runtime.scheduler import Scheduler
from fastllava.runtime.sequence import Sequence, Status

log = logging.getLogger("fastllava.runtime")


class RequestHandle:
    """A submitted sequence plus where its events go. `on_event(kind, value)` is called on the
    engine thread and must not block (queue.put / loop.call_soon_threadsafe)."""

    def __init__(self, seq: Sequence, on_event: Callable[[str, object], None]):
        self.seq = seq
        self.on_event = on_event
        self.done = threading.Event()         # set once the sequence has left the engine

    @property
    def metrics(self) -> dict:
        return self.seq.metrics.summary()


class Engine:
    def __init__(self, scheduler: Scheduler, runner, overlap: bool = False):
        self.scheduler = scheduler
        self.runner = runner
        self.overlap = overlap
        self._in_flight = None          # overlap: (batch, pending rows, StepOutput) of step N
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self.num_steps = 0

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, seq: Sequence, on_event: Callable[[str, object], None]) -> RequestHandle:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        handle = RequestHandle(seq, on_event)
        self._ensure_thread()
        self._inbox.put(("add", handle))
        return handle

    def cancel(self, handle: RequestHandle, wait_s: float | None = 30.0) -> None:
        """Stop the request and free its pages; waits (up to wait_s) until that has happened."""
        if handle.done.is_set():
            return
        self._inbox.put(("cancel", handle))
        if wait_s and threading.current_thread() is not self._thread:
            handle.done.wait(wait_s)

    def call(self, fn: Callable[[], object], wait_s: float = 60.0):
        """Run fn() on the engine thread between steps (it owns the scheduler and caches) and
        return its result."""
        done, box = threading.Event(), {}

        def run():
            try:
                box["value"] = fn()
            except Exception as e:
                box["error"] = e
            done.set()
        self._ensure_thread()
        self._inbox.put(("call", run))
        if not done.wait(wait_s):
            raise TimeoutError(f"the engine thread did not run {fn} within {wait_s} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="fastllava-engine",
                                                daemon=True)
                self._thread.start()

    # ---- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        device = getattr(self.runner, "device", None)
        if device is not None and device.type == "cuda":
            # A new thread's current device is cuda:0, and Triton launches (and the graphs'
            # replays) go to the current device: make it the model's.
            torch.cuda.set_device(device)
        try:
            while True:
                # Block while idle; otherwise take whatever arrived during the last step.
                busy = self.scheduler or self._in_flight is not None
                msgs = [self._inbox.get()] if not busy else []
                while True:
                    try:
                        msgs.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if self._in_flight is not None and any(kind == "call" for kind, _ in msgs):
                    self._drain()       # fn() sees (and changes) settled state, as in the serial loop
                for kind, item in msgs:
                    if kind == "stop":
                        self._fail_all(RuntimeError("the engine was shut down"))
                        return
                    if kind == "call":
                        item()
                    else:
                        (self._add if kind == "add" else self._cancel)(item)
                if self.overlap:
                    self._overlapped_step()
                elif self.scheduler and not self._step():
                    time.sleep(0.001)   # nothing could run (a step that only preempted): no spin
        except BaseException as e:  # a bug in the loop itself: never leave callers hanging
            log.exception("engine loop crashed")
            self._fail_all(e)
            raise

    def _add(self, handle: RequestHandle) -> None:
        try:
            self.scheduler.add(handle.seq)
        except Exception as e:
            self._close(handle, "error", e)
            return
        self._handles[handle.seq.seq_id] = handle

    def _cancel(self, handle: RequestHandle) -> None:
        if handle.seq.seq_id in self._handles:
            self.scheduler.abort(handle.seq, "cancelled")
            self._close(handle, "finish", "cancelled")

    def _step(self) -> bool:
        """One step; False if nothing was scheduled."""
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        self.num_steps += 1
        try:
            tokens = self.runner.run(batch)
        except Exception as e:
            self._fail_step(batch, e)
            return True
        self._deliver(batch.seqs, tokens, self.scheduler.update(batch, tokens))
        return True

    def _overlapped_step(self) -> None:
        """Launch the next step (if any), then finish the one launched before it."""
        launched = None
        batch = self.scheduler.schedule() if self.scheduler else None
        if batch is not None:
            self.num_steps += 1
            try:
                out = self.runner.launch(batch)
                launched = (batch, self.scheduler.advance(batch, out.row_placeholders()), out)
            except Exception as e:
                self._fail_step(batch, e)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._finish_step(*previous)
        elif batch is None and self.scheduler:
            time.sleep(0.001)   # nothing could run (a step that only preempted): no spin

    def _drain(self) -> None:
        previous, self._in_flight = self._in_flight, None
        self._finish_step(*previous)

    def _finish_step(self, batch, pending, out) -> None:
        try:
            tokens = out.tokens()
        except Exception as e:
            self._fail_step(batch, e)
            return
        finished = self.scheduler.resolve(pending, tokens)
        self._deliver([seq for seq, _, _ in pending], tokens, finished)

    def _deliver(self, seqs, tokens, finished) -> None:
        """Emit each sampled token; close the requests that finished. Rows that did not sample
        and seqs closed before their ids arrived (cancelled, or, in the overlapped loop, stopped
        one step earlier: the lag's extra token) are skipped."""
        finished = {seq.seq_id for seq in finished}
        handles, emit = self._handles, self._emit
        for seq, token in zip(seqs, tokens):
            handle = handles.get(seq.seq_id)
            if token is None or handle is None:
                continue
            emit(handle, "token", token)
            if finished and seq.seq_id in finished:
                self._close(handle, "finish", seq.finish_reason)

    def _fail_step(self, batch, error: Exception) -> None:
        log.error("step failed; failing its %d requests", len(batch.seqs), exc_info=error)
        for seq in batch.seqs:
            if seq.seq_id in self._handles:
                self.scheduler.abort(seq, "error")
                self._close(self._handles[seq.seq_id], "error", error)

    def _close(self, handle: RequestHandle, kind: str, value) -> None:
        self._handles.pop(handle.seq.seq_id, None)
        self.runner.release(handle.seq)
        handle.done.set()
        self._emit(handle, kind, value)

    @staticmethod
    def _emit(handle: RequestHandle, kind: str, value) -> None:
        try:
            handle.on_event(kind, value)
        except Exception:  # e.g. the caller's event loop is closed: its request is moot
            log.exception("delivering a %s event failed", kind)

    def _fail_all(self, error: BaseException) -> None:
        for handle in list(self._handles.values()):
            if handle.seq.status is not Status.FINISHED:
                self.scheduler.abort(handle.seq, "error")
            self._close(handle, "error", error)
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._close(handle, "error", error)
            elif kind == "call":
                handle()
