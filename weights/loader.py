"""Strict, streaming weight loading from safetensors into a pre-allocated engine model.

Two passes. The plan reads only safetensors headers (names, shapes, dtypes; checked for damage by
discover.read_shards, which raises CheckpointError for a broken file): every key is mapped to
its canonical parameter (keymaps.py) and checked — unexpected keys, shape mismatches, double
assignments and never-assigned parameters are all collected and raised together in one
WeightLoadError before any data is read. The copy pass then streams one tensor at a time
(`safe_open(...).get_tensor`, a memory map), copies it into its parameter or fused row slice, and
drops it: peak host memory is one tensor, never the model.

Fused parameters (qkv_proj, gate_up_proj) live on a module with `output_sizes`; checkpoint shard j
fills rows [sum(sizes[:j]), sum(sizes[:j+1])). A model may define `is_unused_weight(name) -> bool`
for canonical names it deliberately does not hold (vision layers after the feature layer).

FP8 parameters (float8_e4m3fn `…weight` with its fp32 `…weight_scale` (out, 1), see
kernels/fp8_linear) are filled either from a floating checkpoint tensor, quantized per row as it
streams in (one tensor's fp32 temporaries at a time, never the model), or from a pre-quantized
F8_E4M3 tensor plus its `weight_scale` tensor; an F8_E4M3 tensor anywhere else is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections import defaultdict
from collections.abc import Callable

import torch
from safetensors import safe_open

from fastllava.kernels.fp8_linear import FP8_DTYPE, quantize_fp8_rows

from .discover import read_shards
from .keymaps import FUSED, UnknownKeyError, canonical_name
from .sharding import TensorShard, tensor_shards
from .shards import FLOAT_DTYPES, unloadable_dtype

_LIST_LIMIT = 20


class WeightLoadError(ValueError):
    """The checkpoint's tensors do not match the model exactly (names, shapes, dtypes, coverage)."""


@dataclasses.dataclass(frozen=True)
class _Copy:
    file: pathlib.Path
    key: str                    # checkpoint tensor name
    param: str                  # canonical (prefixed) parameter name
    rows: tuple[int, int] | None  # row slice of a fused parameter, None = whole tensor
    scale: str | None = None    # quantize to FP8 while copying; the scale parameter (same rows)
    shard: TensorShard | None = None  # tensor parallelism: read only this rank's slice
    part: int | None = None     # the fused part being read (None: unfused or pre-fused)


def load_weights(model: torch.nn.Module, sources: list[tuple[pathlib.Path, str, str]], *,
                 dtype: torch.dtype, device: torch.device | str,
                 progress: Callable[[int, int], None] | None = None,
                 read_elsewhere: frozenset[str] = frozenset()) -> None:
    """Fill every parameter of `model` exactly once from `sources`.

    sources: (checkpoint folder, layout, prefix) triples; prefix is prepended to that source's
    canonical names (e.g. "vision_tower." for a stand-alone CLIP checkpoint).
    Floating parameters must already be `dtype` on `device` (built there or via `to_empty`;
    FP8 weights float8_e4m3fn, their `weight_scale` fp32); checkpoint tensors are converted to
    them. progress(done, total) is called after each tensor. read_elsewhere: checkpoint keys
    another reader took (the FP8 KV-cache scales, weights/kv_scales.py), skipped here.
    """
    planner = _Planner(model, dtype, torch.device(device))
    for folder, layout, prefix in sources:
        planner.add_source(pathlib.Path(folder), layout, prefix, read_elsewhere)
    plan = planner.finish()

    by_file: dict[pathlib.Path, list[_Copy]] = defaultdict(list)
    for item in plan:
        by_file[item.file].append(item)
    done, total = 0, len(plan)
    with torch.no_grad():
        for file, items in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for item in items:
                    tensor = f.get_tensor(item.key) if item.shard is None else \
                        item.shard.read(f, item.key, item.part)
                    dst = planner.params[item.param]
                    if item.rows is not None:
                        dst = dst[item.rows[0]:item.rows[1]]
                    if item.scale is not None:
                        tensor = _quantize(tensor, dst.device, planner.params[item.scale],
                                           item.rows)
                    if tensor.dtype != dst.dtype and dst.device.type != "cpu":
                        # A host → device copy_ with a dtype change casts on the host (an extra
                        # host temporary, single pass on the CPU): move the stored bytes first,
                        # cast on the device.
                        tensor = tensor.to(dst.device)
                    dst.copy_(tensor)
                    del tensor
                    done += 1
                    if progress is not None:
                        progress(done, total)
    if torch.device(device).type == "cuda":
        # The device-side casts above leave their largest stored-dtype temporary (up to ~0.9 GB
        # for a 34B embedding) cached by the allocator: hand it back before the memory plan.
        torch.cuda.empty_cache()


# Rows quantized at once: bounds the fp32 temporaries on the device to ~2 x 64 MiB per chunk
# (a 34B gate_proj is 20480 x 7168) so they do not linger in the allocator's cache and shrink
# the KV pool planned after loading. Rows are independent, so chunking changes no bit.
_QUANT_CHUNK_ELEMENTS = 1 << 24


def _quantize(tensor: torch.Tensor, device: torch.device, scale: torch.Tensor,
              rows: tuple[int, int] | None) -> torch.Tensor:
    """A floating checkpoint tensor (R, C) quantized per row on `device`, a chunk of rows at a
    time (the stored bytes move, the fp32 math runs there): returns its FP8 rows, writes its
    scales into `scale` (rows `rows` of it)."""
    scale = scale if rows is None else scale[rows[0]:rows[1]]
    q = torch.empty(tensor.shape, dtype=FP8_DTYPE, device=device)
    step = max(1, _QUANT_CHUNK_ELEMENTS // max(1, tensor.shape[1]))
    for i in range(0, tensor.shape[0], step):
        q[i:i + step], scale[i:i + step] = quantize_fp8_rows(tensor[i:i + step].to(device))
    return q


_Slot = tuple[str, "int | None"]  # (parameter, fused shard index or None)


class _Planner:
    """Header-only pass: maps every checkpoint key to a copy and collects every problem."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        self.params = dict(model.named_parameters())
        self.fused = _fused_sizes(model)
        self.shards = tensor_shards(model)     # tensor parallelism: name → this rank's slice
        self.is_unused = getattr(model, "is_unused_weight", None) or (lambda name: False)
        self.problems: dict[str, list[str]] = {
            k: [] for k in ("unexpected", "shape", "dtype", "twice", "missing")}
        self.plan: list[_Copy] = []
        self.assigned: dict[_Slot, str] = {}   # slot → where it came from
        self.reported: set[str] = set()        # parameters already in an error: not "missing"
        # FP8 weight → its scale parameter; both keep their own dtypes (e4m3, fp32).
        self.fp8_scale = {name: name.removesuffix("weight") + "weight_scale"
                          for name, p in self.params.items() if p.dtype == FP8_DTYPE}
        own_dtype = {**{w: FP8_DTYPE for w in self.fp8_scale},
                     **{s: torch.float32 for s in self.fp8_scale.values()}}
        for name, p in self.params.items():
            if p.is_floating_point() and p.dtype != own_dtype.get(name, dtype):
                self._fail("dtype", f"{name} is {p.dtype}, but loading in {dtype}", name)
            elif not _same_device(p.device, device):
                self._fail("dtype", f"{name} is on {p.device}, but loading to {device} (allocate "
                           "the model there first, e.g. with to_empty)", name)

    def _fail(self, kind: str, message: str, param: str | None = None) -> None:
        self.problems[kind].append(message)
        if param is not None:
            self.reported.add(param)

    def add_source(self, folder: pathlib.Path, layout: str, prefix: str,
                   read_elsewhere: frozenset[str]) -> None:
        for key, info in read_shards(folder).items():  # headers already checked for damage
            if key in read_elsewhere:
                continue
            where = f"{key!r} ({info.file.name})"
            try:
                mapped = canonical_name(key, layout)
            except UnknownKeyError:
                self._fail("unexpected", f"{where}: no rule of layout {layout!r}")
                continue
            if mapped is not None:  # None: known and intentionally ignored
                self._add(where, _Copy(info.file, key, prefix + mapped[0], None), mapped[1],
                          info.shape, info.dtype)

    def _add(self, where: str, item: _Copy, shard: int | None, shape: tuple[int, ...],
             st_dtype: str) -> None:
        name = item.param
        if name not in self.params:
            if not self.is_unused(name):
                self._fail("unexpected", f"{where} → {name}: the model has no such parameter")
            return
        if name in self.reported:
            return  # the parameter itself is wrong (dtype/device): said once already
        param, sizes = self.params[name], self.fused.get(name)
        if param.is_floating_point() and st_dtype not in FLOAT_DTYPES + (
                ("F8_E4M3",) if param.dtype == FP8_DTYPE else ()):
            # An integer tensor where a weight belongs: the file, not the model, is wrong.
            raise unloadable_dtype(item.file, item.key, st_dtype)
        if param.is_floating_point() != (st_dtype in FLOAT_DTYPES + ("F8_E4M3",)):
            return self._fail("dtype", f"{where} → {name}: checkpoint dtype {st_dtype}, "
                              f"parameter {param.dtype}", name)
        expected = tuple(param.shape)
        if shard is not None:
            if sizes is None or shard >= len(sizes):
                return self._fail("unexpected", f"{where} → {name} shard {shard}: the model's "
                                  f"parameter is not fused that way (sizes {sizes})", name)
            start = sum(sizes[:shard])
            item = dataclasses.replace(item, rows=(start, start + sizes[shard]))
            expected = (sizes[shard],) + expected[1:]
        if name in self.shards:  # a rank's slice: the checkpoint holds the full tensor
            expected = self.shards[name].full_shape(expected, shard)
            item = dataclasses.replace(item, shard=self.shards[name], part=shard)
        if shape != expected:
            target = name if shard is None else _slot((name, shard))
            return self._fail("shape", f"{where} → {target}: expected {list(expected)}, got "
                              f"{list(shape)}", name)
        # A pre-fused checkpoint tensor (shard None on a fused parameter) fills every shard.
        slots = [(name, shard)] if sizes is None or shard is not None else \
            [(name, j) for j in range(len(sizes))]
        if name in self.fp8_scale and st_dtype != "F8_E4M3":  # quantized here: fills the scale too
            item = dataclasses.replace(item, scale=self.fp8_scale[name])
            slots += [(item.scale, j) for _, j in slots]
        for slot in slots:
            if slot in self.assigned:
                self._fail("twice", f"{_slot(slot)} from {self.assigned[slot]} and {where}")
            self.assigned[slot] = where
        self.plan.append(item)

    def finish(self) -> list[_Copy]:
        """The copies to make; raises WeightLoadError listing every problem if there is any."""
        for name in self.params:
            if name in self.reported:
                continue
            sizes = self.fused.get(name)
            slots = [(name, j) for j in range(len(sizes))] if sizes else [(name, None)]
            self.problems["missing"] += [_slot(s) for s in slots if s not in self.assigned]
        if any(self.problems.values()):
            raise WeightLoadError(_report(self.problems))
        return self.plan


def _fused_sizes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Fused parameter name → its module's output_sizes (rows per shard)."""
    sizes: dict[str, tuple[int, ...]] = {}
    for mod_name, module in model.named_modules():
        out = getattr(module, "output_sizes", None)
        if out is None:
            continue
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if sum(out) != p.shape[0]:
                raise WeightLoadError(f"model bug: {name} has {p.shape[0]} rows but its module's "
                                      f"output_sizes {tuple(out)} sum to {sum(out)}")
            sizes[name] = tuple(out)
    return sizes


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else None
        return (a.index if a.index is not None else current) == \
            (b.index if b.index is not None else current)
    return a.index == b.index


def _slot(slot: _Slot) -> str:
    name, shard = slot
    if shard is None:
        return name
    source = [s for s, (f, j) in FUSED.items() if name.endswith(f) and j == shard]
    label = source[0].rsplit(".", 2)[-2] if source else f"shard {shard}"
    return f"{name}[{label}]"


def _report(problems: dict[str, list[str]]) -> str:
    titles = {"unexpected": "unexpected checkpoint tensors", "shape": "shape mismatches",
              "dtype": "dtype / device mismatches", "twice": "parameters assigned twice",
              "missing": "parameters never assigned"}
    lines = ["checkpoint does not match the model:"]
    for kind, items in problems.items():
        if not items:
            continue
        lines.append(f"  {titles[kind]} ({len(items)}):")
        lines += [f"    {s}" for s in items[:_LIST_LIMIT]]
        if len(items) > _LIST_LIMIT:
            lines.append(f"    … and {len(items) - _LIST_LIMIT} more")
    return "\n".join(lines)
