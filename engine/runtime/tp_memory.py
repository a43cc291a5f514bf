"""The KV pool under tensor parallelism: every rank measures its own GPU, the pool is the
smallest rank's.

Each rank holds KVH/N heads per layer, so a page costs every rank the same bytes (page_bytes of
the local text config), but the ranks' memory differs: rank 0 also holds the vision tower, the
projector and the image-feature cache, and another process may share a worker's GPU. So on CUDA
every rank runs `memory_plan.measure` over the same dummy steps (rank 0 sends them, as any
step), the ranks exchange what they measured (one allgather of 5 ints each, ctrl group), and
each rank plans every rank's pool with `plan_kv_pool` from the same data: all arrive at the same
page count, the minimum, with no further message. A rank too small for one request makes every
rank raise the same error, naming that rank and its terms.
"""

from __future__ import annotations

import dataclasses

import torch

from fastllava.runtime.memory_plan import MemoryPlan, Measured, measure, plan_kv_pool


@dataclasses.dataclass(frozen=True)
class PoolParams:
    """Everything but the measurement that plan_kv_pool needs; rank 0 sends it to the workers."""
    fraction: float
    image_cache: int        # bytes of rank 0's image-feature cache (the workers hold none)
    page_bytes: int         # one page of this rank's KV heads, all layers
    page_size: int
    need_tokens: int
    image_tokens: int

    def to_tensor(self) -> torch.Tensor:
        # float64 holds every int here exactly (all < 2**53)
        return torch.tensor(dataclasses.astuple(self), dtype=torch.float64)

    @classmethod
    def zeros(cls) -> torch.Tensor:
        """A receive buffer for to_tensor()."""
        return torch.zeros(len(dataclasses.fields(cls)), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> PoolParams:
        fraction, *ints = t.tolist()
        return cls(fraction, *(int(v) for v in ints))


def agree_kv_pool(comm, total: int, measured: Measured, pool: PoolParams) -> MemoryPlan:
    """Every rank: this rank's plan with the smallest rank's page count (equal on every rank)."""
    rows = comm.gather_ints([total, *dataclasses.astuple(measured)])
    args = dict(fraction=pool.fraction, page_bytes=pool.page_bytes, page_size=pool.page_size,
                need_tokens=pool.need_tokens, image_tokens=pool.image_tokens)

    def plan(rank: int, max_pages: int | None = None) -> MemoryPlan:
        row_total, *row = rows[rank]
        try:
            return plan_kv_pool(total=row_total, measured=Measured(*row), max_pages=max_pages,
                                image_cache=pool.image_cache if rank == 0 else 0, **args)
        except ValueError as e:
            raise ValueError(f"tensor-parallel rank {rank}: {e}") from None

    pages = min(plan(r).kv_pages for r in range(len(rows)))
    return dataclasses.replace(plan(comm.rank, pages),
                               source=f"measured, smallest of {len(rows)} ranks")


def measure_and_agree(comm, mem, make_scratch, prefill, decode, pool: PoolParams) -> MemoryPlan:
    """Every rank, in step: `memory_plan.measure` of this rank's allocator over the dummy steps
    (rank 0 runs them, the workers run what it sends), then `agree_kv_pool`."""
    return agree_kv_pool(comm, mem.total(), measure(mem, make_scratch, prefill, decode), pool)


def measure_own(comm, mem, make_scratch, step, has_decode: bool, pool: PoolParams) -> int | None:
    """A worker's side of TPDriver.measured_plan (`step(scratch_kv)` runs the next step rank 0
    sends): the agreed page count, or None when a rank is too small, which rank 0 reports."""
    try:
        return measure_and_agree(comm, mem, make_scratch, step, step if has_decode else None,
                                 pool).kv_pages
    except ValueError:
        return None
