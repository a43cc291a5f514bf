"""The compiled resample passes (resample_passes.c): built once per machine, loaded with ctypes.

`passes()` is the loaded library, or None when it cannot be had (then the CPU path resizes with
Pillow itself, bit for bit the same). The C file is compiled with the system C compiler (`$CC`,
else `cc`) at `-O3 -march=native`, so the build is only valid on this kind of CPU: the cached
shared object is named by a hash of the source, the compiler's version and the CPU's feature
flags, under `$FASTLLAVA_CACHE_DIR` (default `$XDG_CACHE_HOME/fastllava` or
`~/.cache/fastllava`). Triton builds its launchers the same way, so a machine that runs the
GPU kernels has the compiler. `FASTLLAVA_NATIVE=0` turns the compiled path off.

ctypes releases the GIL for the duration of each call, so the passes run on plain threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["passes", "compile_to", "load", "SOURCE"]

log = logging.getLogger("fastllava.preprocess")

SOURCE = Path(__file__).with_name("resample_passes.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: list = []          # [lib or None] once tried


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    if os.environ.get("FASTLLAVA_CACHE_DIR"):
        return Path(os.environ["FASTLLAVA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastllava"


def compile_to(cc: list[str], flags: list[str], target: str) -> None:
    """Compile SOURCE into the shared object `target` (raises RuntimeError on failure)."""
    done = subprocess.run(cc + flags + [str(SOURCE), "-o", target], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[:500]}")


def load(path: str) -> ctypes.CDLL:
    """A built shared object, with the passes' signatures declared."""
    lib = ctypes.CDLL(path)
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.hpass4.argtypes = [p, i64, p, i64, i, i, i, p, p, p, i]
    lib.vpass4.argtypes = [p, i64, p, i64, i, i, i, p, p, p, i, p]
    lib.hpass4.restype = lib.vpass4.restype = None
    return lib


def _build(cc: list[str]) -> Path:
    version = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode(), " ".join(_FLAGS).encode()]))
    target = _cache_dir() / f"resample_passes-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        compile_to(cc, _FLAGS, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("FASTLLAVA_NATIVE", "1") == "0":
        return None
    cc = shlex.split(os.environ.get("CC") or "cc")
    try:
        return load(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("compiled resample passes unavailable (%s): Pillow resizes on the CPU", e)
        return None


def passes() -> ctypes.CDLL | None:
    """The library with `hpass4` and `vpass4`, or None (no compiler, build failed, disabled)."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]
