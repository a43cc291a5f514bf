"""Rank 0 of a tensor-parallel engine: starts the N-1 worker processes, runs each step with
them, notices when one dies, and stops them all on close.

Rank 0 stays in the API process and owns the scheduler, block manager, sampler, image path and
feature cache; the engine loop is the ordinary one (runtime/engine.py) with `StepProxy`
(runtime/tp_step.py) in place of the model inside the ModelRunner, so each step reaches the
workers as one descriptor and the ranks then meet only in the decoder's all-reduces.

Failure handling: before every step the driver checks that every worker process is alive, and
every collective has a timeout (tp_comm.py). On gloo (CPU) a dead or silent worker fails the
step in flight (its requests get a WorkerDiedError naming the rank, pid and exit code) and marks
the driver broken: every later step and every new request is refused with the same error. On
NCCL a worker found dead before a step is handled the same way; one that dies or stalls inside a
step meets NCCL's watchdog, which by default ends the API process after the timeout (eager
collectives) or does not see it (collectives captured in the decode graphs): see tp_comm.py.

Start-up, in build_engine's order: on CUDA the ranks measure their memory over the same dummy
steps and agree on the smallest KV pool (OP_MEASURE, runtime/tp_memory.py); the pool is set up
(OP_SETUP); the decode buckets are built, and captured as CUDA graphs with their collectives
where graphs apply, on every rank at once (OP_GRAPHS, runtime/tp_graphs.py). Decode steps then
replay a bucket on every rank (OP_DECODE); prefill and mixed steps go through the StepProxy.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import torch
import torch.distributed as dist
import subprocess
import sys

from fastllava.kernels.kv_quant import FP8_KV_DTYPE
from fastllava.models.parallel import TensorParallel, local_text_config
from fastllava.runtime import tp_step
from fastllava.runtime.build import build_engine
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.memory_plan import MemoryPlan
from fastllava.runtime.tp_comm import TPComm
from fastllava.runtime.tp_graphs import TPDecodeGraphs
from fastllava.runtime.tp_memory import PoolParams, measure_and_agree
from fastllava.runtime.tp_worker import WorkerArgs

log = logging.getLogger("fastllava.tp")

# Longest a step's collective may wait for a peer: generous beside any real step (a 34B 8k-token
# prefill is ~1 s), short beside "hung for ever".
STEP_TIMEOUT_S = 120.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the engine cannot run steps any more."""


class TPDriver:
    def __init__(self, world: int, model: str, *, revision: str | None, device: torch.device,
                 dtype: torch.dtype, backend: str, timeout_s: float | None = None,
                 random_config: str | None = None, random_seed: int = 0):
        """Start the workers; they load `model` (a checkpoint), or random weights of the
        weights.random config `random_config` (benchmarks; fill seed `random_seed`), while
        rank 0 loads its own shard."""
        self.world, self.broken, self._is_setup, self._closed = world, None, False, False
        self._measuring = False
        self.comm = None
        timeout_s = STEP_TIMEOUT_S if timeout_s is None else timeout_s
        # The rendezvous waits for fresh interpreters to import torch: never less than a minute.
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=max(timeout_s, 60.0)))
        args = WorkerArgs(model, revision, str(device), str(dtype), backend, world, store.port,
                          timeout_s, os.getpid(), random_config, random_seed)
        # A fresh interpreter per worker (`python -m fastllava.runtime.tp_worker`), as the spawn
        # start method would give, but without multiprocessing re-importing the caller's main
        # script in every worker (a script without `if __name__ == "__main__"` would run again).
        self.procs = [subprocess.Popen([sys.executable, "-m", "fastllava.runtime.tp_worker",
                                        str(rank), args.to_json()]) for rank in range(1, world)]
        try:
            self.comm = TPComm(store, 0, world, device, timeout_s)
        except Exception:
            self.close()
            raise
        self._store = store
        self.tp = TensorParallel(0, world, self.comm)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def confirm_loaded(self, ok: bool) -> None:
        """After rank 0 loaded its shard (ok) or failed to: every rank's verdict. A failure
        anywhere stops the workers; raises when rank 0 itself succeeded."""
        if self.comm.agree(ok, idle=True):
            return
        self.broken = WorkerDiedError("a tensor-parallel rank could not load its shard of the "
                                      "model (its error is in the log above)")
        self.close()
        if ok:
            raise self.broken

    def setup(self, kv) -> None:
        """Tell the workers the KV pool rank 0 planned (pages, page size, fp8 pages); idempotent."""
        if self._is_setup:
            return
        self.check()
        self.comm.broadcast_header(tp_step.header(tp_step.OP_SETUP, kv.num_pages, kv.page_size,
                                                  int(kv.dtype == FP8_KV_DTYPE)))
        self.comm.agree(True)
        self._is_setup = True

    def check(self) -> None:
        """Raise the driver's failure (or a newly dead worker's) instead of running anything."""
        if self.broken is not None:
            raise self.broken
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                self.broken = WorkerDiedError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code "
                    f"{p.returncode}: this engine refuses new requests; restart it")
                raise self.broken

    def step(self, fn, kv) -> torch.Tensor:
        """fn(comm) with every rank: the descriptor broadcast and the forward. While the ranks
        measure, each steps on its own scratch KV instead of the pool."""
        if not self._measuring:
            self.setup(kv)
        return self._guarded(fn)

    def measured_plan(self, mem, steps, decode, pool: PoolParams) -> MemoryPlan:
        """Every rank measures its own memory over rank 0's dummy steps (worst-case prefill, and
        the eager decode when graphs are captured); the pool is the smallest rank's."""
        def with_every_rank(comm) -> MemoryPlan:
            # The workers' scratch KV in rank 0's page dtype: fp8 pages measure as fp8 bytes.
            comm.broadcast_header(tp_step.header(tp_step.OP_MEASURE, steps.scratch_pages,
                                                 int(decode is not None),
                                                 int(steps.kv_dtype == FP8_KV_DTYPE)))
            comm.broadcast_header(pool.to_tensor())
            self._measuring = True
            try:
                return measure_and_agree(comm, mem, steps.scratch_kv, steps.worst_case, decode,
                                         pool)
            finally:
                self._measuring = False
        return self._guarded(with_every_rank, refusals=(ValueError,))

    def decode_graphs(self, proxy, ops, kv, max_batch_size: int, max_pages_per_seq: int,
                      capture: bool) -> TPDecodeGraphs:
        """Every rank builds its decode buckets over its KV pool at once (captured: the
        collectives inside the graphs must be captured by all ranks together)."""
        self.setup(kv)

        def with_every_rank(comm) -> TPDecodeGraphs:
            comm.broadcast_header(tp_step.header(tp_step.OP_GRAPHS, max_batch_size,
                                                 max_pages_per_seq, int(capture)))
            return TPDecodeGraphs(proxy.shard, ops, kv, max_batch_size, max_pages_per_seq, comm,
                                  capture=capture, driver=self)
        return self._guarded(with_every_rank)

    def _guarded(self, fn, refusals: tuple[type[Exception], ...] = ()):
        """fn(comm) after the liveness check; a failure marks the driver broken, except the
        `refusals`, which every rank reaches alike (the ranks stay in step)."""
        self.check()
        try:
            return fn(self.comm)
        except refusals:
            raise
        except Exception as e:
            self.broken = self._diagnose(e)
            raise self.broken from e

    def _diagnose(self, error: Exception) -> RuntimeError:
        """A failed collective: name the worker that died if one did (its exit may take a moment
        to be observed), else report the error itself."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                self.check()
            except WorkerDiedError as died:
                return died
            time.sleep(0.05)
        return WorkerDiedError(f"a tensor-parallel step failed ({error}); this engine refuses "
                               "new requests; restart it")

    def close(self, join_s: float = 10.0) -> None:
        """Stop the workers (politely, then by force); leaves no process behind."""
        if self._closed:
            return
        self._closed = True
        if self.comm is not None and self.broken is None:
            try:
                self.comm.broadcast_header(tp_step.header(tp_step.OP_STOP))
            except Exception:
                pass
        if self.broken is not None:   # no stop message was sent: a live worker will not exit
            join_s = min(join_s, 1.0)
        for p in self.procs:
            try:
                p.wait(join_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(join_s)
        self.comm = None
        if hasattr(self, "tp"):
            self.tp.comm = None


def build_tp_engine(model, ops, text, dtype, device, rc: RuntimeConfig, driver: TPDriver):
    """build_engine with the StepProxy as the model and the per-rank KV heads; the driver
    brings the workers along through the memory plan, the pool and the decode graphs."""
    return build_engine(tp_step.StepProxy(model, driver), ops,
                        local_text_config(text, driver.world), dtype, device, rc, tp=driver)
