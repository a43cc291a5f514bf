"""The collectives of one tensor-parallel group, on torch.distributed process groups.

Two groups over one TCPStore rendezvous (127.0.0.1):
- `ctrl` (gloo, CPU tensors): the per-step header the workers wait on while the engine is idle,
  and the setup / stop messages. A worker may sit in it for hours, so it waits without limit;
  a dead peer still ends the wait at once (gloo sees the closed connection).
- `step` (gloo on CPU, NCCL on CUDA): the step payload and the per-layer all-reduces, each with
  `timeout_s`. gloo: per operation, so a rank that stops answering fails the step (an error
  here). NCCL: its watchdog, whose default reaction (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) is to
  end the whole process, not to raise; collectives captured in a CUDA graph are not watched at
  all (a rank dying inside a replayed decode step can leave rank 0 waiting). The NCCL path is not
  exercised here (no GPUs on the build machine).
The groups are built directly (not `init_process_group`), so an API process may hold several
engines, and nothing global is left behind when one closes.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# How long a worker waits for the next step header: "for ever" (an idle server). Dead peers end
# the wait anyway, and a worker whose parent died exits (tp_worker's parent watch).
_IDLE = datetime.timedelta(days=3650)


class TPComm:
    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device,
                 timeout_s: float):
        self.rank, self.world, self.device = rank, world, device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, world, _IDLE)
        step_store = dist.PrefixStore("step", store)
        if device.type == "cuda":
            if not dist.is_nccl_available():
                raise RuntimeError("tensor parallelism on CUDA needs torch built with NCCL")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout     # enforced by NCCL's watchdog
            self.step = dist.ProcessGroupNCCL(step_store, rank, world, options)
            # A timed wait() blocks the host until the NCCL kernel finishes (a sync per
            # all-reduce); the untimed one only orders the compute stream after it.
            self._step_timeout = None
        else:
            self.step = dist.ProcessGroupGloo(step_store, rank, world, self.timeout)
            self._step_timeout = self.timeout

    # ---- per layer (step group) -------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns t."""
        self._wait(self.step.allreduce([t]))
        return t

    def all_gather_last(self, t: torch.Tensor, full: int) -> torch.Tensor:
        """Every rank's (..., c_r) pieces concatenated along the last dim and cut to `full`
        columns (the last rank's piece is zero-padded to c = ceil(full / world) first)."""
        c = -(-full // self.world)
        if t.shape[-1] != c:
            t = torch.nn.functional.pad(t, (0, c - t.shape[-1]))
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self.step.allgather([out], [t]))
        return torch.cat(out, dim=-1)[..., :full]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's t to every rank (in place)."""
        self._wait(self.step.broadcast([t], dist.BroadcastOptions()))
        return t

    def _wait(self, work) -> None:
        if self._step_timeout is None:
            work.wait()
        else:
            work.wait(self._step_timeout)

    # ---- control (ctrl group, CPU int64) ------------------------------------------------------
    def broadcast_header(self, header: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Rank 0's small CPU tensor to every rank; idle=True waits without limit."""
        self.ctrl.broadcast([header], dist.BroadcastOptions()).wait(_IDLE if idle else self.timeout)
        return header

    def agree(self, ok: bool, idle: bool = False) -> bool:
        """True when every rank says ok (a barrier that also carries a verdict); idle=True waits
        without limit (ranks finish loading their shards minutes apart)."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        self.ctrl.allreduce([flag]).wait(_IDLE if idle else self.timeout)
        return int(flag) == 0

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (same length everywhere), in rank order, on every rank."""
        mine = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self.ctrl.allgather([out], [mine]).wait(self.timeout)
        return [t.tolist() for t in out]
