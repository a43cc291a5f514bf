"""Safetensors headers, parsed and checked by hand before any tensor is touched.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data:
offsets are relative to its start and must tile it exactly. The `safetensors` library checks the
same, but reports a shard cut short or overwritten as a bare "header too large" / "incomplete
metadata" traceback without the file name; and the data offsets let a shard cut short *inside*
the tensor data be caught here, from its size alone, before a weight is read. Reading a header
costs one small read per shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from fastllava.checkpoint_files import CheckpointError, damaged

# Bytes per element of the dtypes fastllava can load. Floating weights are converted to the
# engine's dtype; integer/bool tensors are only ever index buffers the key maps ignore.
# F8_E4M3 (float8_e4m3fn) is loaded only into FP8 parameters (weights/loader.py).
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str             # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → its info for safetensors file `path`; CheckpointError if the file is damaged
    (unreadable header, file shorter or longer than the header says, inconsistent offsets) or
    holds a dtype fastllava cannot load."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(path, f"the file is {size} bytes, too short for a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > _MAX_HEADER:
            raise damaged(path, f"unreadable header: it claims {length} header bytes but the file "
                          f"is {size} bytes (cut short, or overwritten)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"unreadable header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise damaged(path, "unreadable header (not a JSON object)")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, entry)
        if dtype not in ITEMSIZE:
            raise unloadable_dtype(path, name, dtype)
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise damaged(path, f"tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes "
                          f"but the header gives it {end - begin}")
        tensors[name] = TensorInfo(path, dtype, shape)
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise damaged(path, f"header offsets of tensor {name!r} start at byte {begin}, "
                          f"expected {covered} (overlapping or gapped tensor data)")
        covered = end
    expected, data = 8 + length + covered, size - 8 - length
    if data < covered:
        raise damaged(path, f"the file is {size} bytes but its header says {expected}: it was "
                      "cut short inside the tensor data (an interrupted download or a full disk)")
    if data > covered:
        raise damaged(path, f"the file is {size} bytes but its header says {expected} "
                      f"({size - expected} unexpected bytes after the tensor data)")
    return tensors


def unloadable_dtype(path: Path, name: str, dtype: str) -> CheckpointError:
    """Tensor `name` of `path` is stored in a dtype fastllava cannot load as a weight."""
    fp8 = (" into this parameter (FP8 loads only into the decoder's linear layers, with "
           "quantization='fp8' or a compressed-tensors quantization_config in config.json)"
           if dtype == "F8_E4M3" else "")
    return CheckpointError(
        f"checkpoint file {path}: tensor {name!r} has dtype {dtype}, which fastllava cannot load"
        f"{fp8} (weights must be {', '.join(FLOAT_DTYPES)}); re-download this file, or use a "
        "checkpoint saved in one of those dtypes")


def _entry(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for types and order."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ints = [*shape, begin, end]
        valid = isinstance(dtype, str) and isinstance(shape, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints)
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid or begin > end:
        raise damaged(path, f"unreadable header entry for tensor {name!r}: {str(entry)[:80]}")
    return dtype, tuple(shape), begin, end
