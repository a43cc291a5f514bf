"""The GPU memory plan: how large the KV pool can be, from a measured peak, not a guess.

On CUDA, `measure` empties the allocator cache, reads what the weights hold, then runs one
worst-case dummy step (runtime/dummy_step.py: a full max_num_batched_tokens prefill with the most
image tiles through the tower, the sampler at max_num_seqs; then for the CUDA-graph pool one eager
decode at max_num_seqs followed by the top-p sampler over its logits, as the largest decode and
sampler graphs run, while stand-ins for what every smaller bucket's graphs keep in the shared pool
are held) and reads the allocator's peak above that. `plan_kv_pool` then does the
arithmetic, a pure function (unit-tested on CPU with a fake provider):

    KV bytes = total x gpu_memory_fraction - weights - activation peak - graph pool
               - image-feature cache - memory outside torch (CUDA context, other processes)

rounded down to whole pages. total x (1 - fraction) is the only slack: fragmentation headroom.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

GB = 1 << 30


class MemoryProvider(Protocol):
    """What the plan reads from a device allocator (CudaMemory on a GPU; fakes in tests)."""

    def empty_cache(self) -> None: ...          # return cached, unused blocks to the driver
    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...             # bytes held by live tensors
    def peak(self) -> int: ...                  # max allocated() since reset_peak
    def total(self) -> int: ...                 # device memory
    def outside_torch(self) -> int: ...         # used but not by this process's allocator


class CudaMemory:
    def __init__(self, device):
        import torch
        self.torch, self.device = torch, device

    def empty_cache(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device)

    def total(self) -> int:
        return self.torch.cuda.mem_get_info(self.device)[1]

    def outside_torch(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return max(0, total - free - self.torch.cuda.memory_reserved(self.device))


@dataclasses.dataclass(frozen=True)
class Measured:
    weights: int          # allocated bytes before the dummy step (weights and buffers)
    activations: int      # peak above that during the worst-case prefill + sampler
    graph_pool: int       # peak above that, decode + top-p sampler at max_num_seqs (0: no graphs)
    outside_torch: int


def measure(mem: MemoryProvider, make_scratch: Callable[[], object],
            prefill_step: Callable[[object], None],
            decode_step: Callable[[object], None] | None) -> Measured:
    """Read the weights on an emptied allocator, then the peak of each dummy step above what it
    started from. make_scratch() allocates what the steps share and the real pool replaces (a
    small KV cache): it is neither weights nor activations, so it is outside both figures."""
    mem.empty_cache()
    weights = mem.allocated()
    scratch = make_scratch()
    peaks = []
    for step in (prefill_step, decode_step):
        if step is None:
            peaks.append(0)
            continue
        mem.empty_cache()
        base = mem.allocated()
        mem.reset_peak()
        step(scratch)
        peaks.append(max(0, mem.peak() - base))
    del scratch
    mem.empty_cache()
    return Measured(weights, peaks[0], peaks[1], mem.outside_torch())


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    source: str                 # "measured" (CUDA), "kv_cache_tokens" (set), "max_context" (CPU)
    kv_pages: int
    kv_tokens: int
    kv_bytes: int
    max_image_requests: int     # KV tokens / the most image tokens one image can take
    weights_bytes: int
    activations_bytes: int | None = None
    graph_pool_bytes: int | None = None
    image_cache_bytes: int | None = None
    outside_torch_bytes: int | None = None
    total_bytes: int | None = None
    gpu_memory_fraction: float | None = None

    def as_dict(self) -> dict:
        """GB figures (3 decimals) for stats() and logs; token and request counts as ints."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_bytes"):
                out[f.name[:-len("_bytes")] + "_gb"] = None if v is None else round(v / GB, 3)
            else:
                out[f.name] = v
        return out

    def summary(self) -> str:
        d = self.as_dict()
        parts = [f"weights {d['weights_gb']} GB"]
        if self.activations_bytes is not None:
            parts += [f"activations peak {d['activations_gb']} GB",
                      f"graph pool {d['graph_pool_gb']} GB",
                      f"image cache {d['image_cache_gb']} GB",
                      f"outside torch {d['outside_torch_gb']} GB"]
        parts += [f"KV {self.kv_tokens} tokens ({d['kv_gb']} GB, {self.source})",
                  f"max concurrent image requests {self.max_image_requests}"]
        return "memory plan: " + ", ".join(parts)


def plan_kv_pool(*, total: int, fraction: float, measured: Measured, image_cache: int,
                 page_bytes: int, page_size: int, need_tokens: int,
                 image_tokens: int, max_pages: int | None = None) -> MemoryPlan:
    """The KV pool that fits `fraction` of `total` beside what was measured (see module doc),
    at most max_pages (tensor parallelism: the smallest rank's pool, runtime/tp_memory.py).
    Refuses, naming every term, when it cannot hold one need_tokens-long request."""
    budget = int(total * fraction)
    held = measured.weights + measured.activations + measured.graph_pool + image_cache \
        + measured.outside_torch
    pages = max(0, (budget - held) // page_bytes)
    if max_pages is not None:
        pages = min(pages, max_pages)
    need = -(-need_tokens // page_size)
    if pages < need:
        raise ValueError(
            f"not enough GPU memory for the KV cache: {pages} pages of {page_size} tokens fit, one "
            f"{need_tokens}-token request needs {need}. Of {total / GB:.2f} GB x "
            f"gpu_memory_fraction {fraction} = {budget / GB:.2f} GB, the weights take "
            f"{measured.weights / GB:.2f} GB, the worst-case step's activations "
            f"{measured.activations / GB:.2f} GB, the CUDA-graph pool "
            f"{measured.graph_pool / GB:.2f} GB, the image-feature cache {image_cache / GB:.2f} "
            f"GB and memory outside torch {measured.outside_torch / GB:.2f} GB; lower "
            "max_context, max_num_batched_tokens, max_num_seqs or image_cache_rows, or raise "
            "gpu_memory_fraction")
    return MemoryPlan(
        source="measured", kv_pages=pages, kv_tokens=pages * page_size,
        kv_bytes=pages * page_bytes, max_image_requests=pages * page_size // max(1, image_tokens),
        weights_bytes=measured.weights, activations_bytes=measured.activations,
        graph_pool_bytes=measured.graph_pool, image_cache_bytes=image_cache,
        outside_torch_bytes=measured.outside_torch, total_bytes=total,
        gpu_memory_fraction=fraction)


def fixed_plan(source: str, kv_tokens: int, *, page_bytes: int, page_size: int,
               weights: int, image_tokens: int) -> MemoryPlan:
    """A pool sized by configuration (kv_cache_tokens, or max_context on CPU): nothing measured."""
    pages = -(-kv_tokens // page_size)
    return MemoryPlan(source=source, kv_pages=pages, kv_tokens=pages * page_size,
                      kv_bytes=pages * page_bytes,
                      max_image_requests=pages * page_size // max(1, image_tokens),
                      weights_bytes=weights)
