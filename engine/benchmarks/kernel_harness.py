"""Check-then-time for one benchmark shape: a `Case` holds the inputs and the implementations
(the Triton launcher, the torch reference, peers such as torch SDPA) and `run_case` turns it into
table rows.

Correctness first (docs/performance.md): the reference is run on the inputs upcast to float32;
data-movement kernels must match the same-dtype reference bit for bit, math kernels must stay
within 2x the same-dtype reference's own relative error (||out - ref32|| / ||ref32||) plus
REL_FLOOR, FlashAttention's rule applied to norms. Only rows that pass are timed.

Timing on the GPU: the Triton launcher and the peers in one CUDA graph (`time_ms` "graph"),
cycling through copies of the inputs that together exceed 2x L2 for memory-bound cases; the torch
references sync with the host (`.tolist()`, boolean indexing), so they are timed eagerly with the
L2 flushed before every call ("eager").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import torch

from fastllava.benchmarks.common import Row, time_ms

REL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ~1 ulp
MAX_COPIES = 128   # input copies to rotate through; 2x L2 needs ~80 at the smallest real shape


@dataclasses.dataclass
class Case:
    """One shape: the same inputs for every implementation.

    impls: label -> callable(*args, **kwargs); the launcher first ("triton", or the torch op it
    calls, e.g. "scaled_mm"), then "torch ref", then peers.
    Peers (labels starting "sdpa") take `prep(args)` instead of args (e.g. the paged KV gathered
    into a dense tensor, built outside the timed call) and their raw output goes through `view`
    to the reference's layout. Kernels that write into their inputs (KV write, rotary) carry
    `make`, which rebuilds `args` bit for bit, so every check and every rotated copy gets fresh
    inputs; `outputs(ret, args)` picks the tensors to compare.
    """
    kernel: str
    name: str
    work: float                      # floor: bytes (unit GB/s) or FLOPs (unit TFLOP/s)
    unit: str
    args: tuple
    impls: dict[str, Callable]
    kwargs: dict = dataclasses.field(default_factory=dict)
    prep: Callable[[tuple], tuple] | None = None
    view: Callable = lambda out: out
    make: Callable[[], tuple] | None = None
    outputs: Callable = lambda ret, args: ret if isinstance(ret, tuple) else (ret,)
    exact: bool = False
    bar: Callable[[float, float | None], str] | None = None   # (value, fraction of ceiling)


def is_peer(label: str) -> bool:
    return label.startswith("sdpa")


def rel_err(actual, expected) -> float:
    """max over outputs of ||actual - expected|| / ||expected|| (float64 norms)."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        if a.shape != e.shape:
            raise ValueError(f"output shape {tuple(a.shape)} != reference {tuple(e.shape)}")
        e64 = e.double()
        worst = max(worst, ((a.double() - e64).norm() / e64.norm().clamp_min(1e-30)).item())
    return worst


def _fp32(args: tuple) -> tuple:
    return tuple(a.to(torch.float32, copy=True) if torch.is_tensor(a) and a.is_floating_point()
                 else a for a in args)


def _clone(args: tuple) -> tuple:
    """Same values, shapes and strides (strided views stay strided), new storage."""
    def clone(a):
        if not torch.is_tensor(a):
            return a
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
    return tuple(clone(a) for a in args)


def _copies(case: Case) -> list[tuple]:
    """Input copies to cycle through while timing: together > 2x L2 for memory-bound cases (the
    floor bytes are what one call touches), one for compute-bound ones."""
    if case.unit != "GB/s":
        return [case.args]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    n = min(MAX_COPIES, max(1, math.ceil(2 * l2 / case.work)))
    return [case.args] + [case.make() if case.make else _clone(case.args) for _ in range(n - 1)]


def run_case(case: Case, ceiling: float | None, on_gpu: bool) -> list[Row]:
    """Check every implementation against the reference, then time the ones that pass."""
    fresh = case.make or (lambda: case.args)

    def bind(label: str, args: tuple) -> Callable[[], object]:
        inputs = case.prep(args) if is_peer(label) else args
        return functools.partial(case.impls[label], *inputs, **case.kwargs)

    def call(label: str, args: tuple) -> tuple:
        ret = bind(label, args)()
        return case.outputs(case.view(ret) if is_peer(label) else ret, args)

    expected = call("torch ref", fresh() if case.exact else _fp32(fresh()))
    ref_err = 0.0 if case.exact else rel_err(call("torch ref", fresh()), expected)
    dtype = next(x.dtype for x in case.args if torch.is_tensor(x) and x.is_floating_point())
    bound = 2 * ref_err + REL_FLOOR[dtype]
    copies = None
    rows = []
    for label in case.impls:
        row = Row(case.kernel, case.name, label, unit=case.unit)
        rows.append(row)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = call(label, fresh())
            if case.exact:
                bad = sum(int((g != x).sum()) for g, x in zip(got, expected, strict=True))
                if bad:
                    row.note = f"ERROR: {bad} elements differ from the reference"
            elif (err := rel_err(got, expected)) > bound:
                row.note = f"ERROR: rel err {err:.2e} > bound {bound:.2e}"
            if row.note:
                continue
            if not on_gpu:
                row.ms = time_ms([bind(label, case.args)], "cpu")
            elif label == "torch ref":
                row.ms = time_ms([bind(label, case.args)], "eager")
            else:
                copies = copies or _copies(case)
                row.ms = time_ms([bind(label, a) for a in copies], "graph")
        except Exception as exc:  # noqa: BLE001 - one bad row must not end the run
            # A peer backend that refuses these inputs says why in warnings, then raises.
            unavailable = is_peer(label) and isinstance(exc, RuntimeError)
            why = " ".join(str(w.message) for w in caught) if unavailable else ""
            why = " ".join((why or str(exc)).split())[:160]
            row.note = f"n/a: {why}" if unavailable else f"ERROR: {type(exc).__name__}: {why}"
            continue
        row.value = case.work / row.ms / (1e6 if case.unit == "GB/s" else 1e9)
        row.pct_ceiling = None if ceiling is None else row.value / ceiling
        row.bar = case.bar(row.value, row.pct_ceiling) if case.bar else ""
    base = rows[0].ms
    for row in rows:
        row.vs_triton = row.ms / base if base and row.ms else None
    return rows
