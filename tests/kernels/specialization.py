"""Triton's specialization key of a launch, computed without a GPU.

Triton compiles one variant per key: the argument types, every int that equals 1 or is a
multiple of 16 and every pointer's 16-byte alignment (unless do_not_specialize), the constexprs
and the launch options. `key_of` runs the launch's arguments through Triton's own binder for a
Hopper target, the function `JITFunction.run` keys its kernel cache with, so it works for
compiled and interpreted kernels alike (the interpreter never compiles: its cache says nothing).
"""

from __future__ import annotations

import contextlib
import inspect

from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastllava import kernels

HOPPER = GPUTarget("cuda", 90, 32)
_binders: dict = {}


def key_of(kernel, args, kwargs) -> str:
    if kernel not in _binders:
        dns = getattr(kernel, "do_not_specialize", None)
        if dns is None:                               # interpreter: InterpretedFunction
            dns = kernel.kwargs.get("do_not_specialize")
        jit = JITFunction(kernel.fn, do_not_specialize=dns)
        _binders[kernel] = create_function_from_signature(jit.signature, jit.params,
                                                          make_backend(HOPPER))
    return f"{kernel.fn.__name__}{_binders[kernel](*args, **kwargs)[1:]!r}"


def all_kernels() -> list:
    """Every @triton.jit _*_kernel of the kernels package."""
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in inspect.getmembers(module):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "fn"):
                found.append(obj)
    return found


@contextlib.contextmanager
def recording(keys: set, kernels_=None, *, launch: bool = True):
    """Add the key of every launch of `kernels_` (default: all) to `keys`; launch it too unless
    launch=False."""
    saved = []
    for kernel in kernels_ or all_kernels():
        real = kernel.run

        def run(*args, grid, warmup, kernel=kernel, real=real, **kwargs):
            keys.add(key_of(kernel, args, kwargs))
            if launch:
                return real(*args, grid=grid, warmup=warmup, **kwargs)
        saved.append((kernel, real))
        kernel.run = run
    try:
        yield keys
    finally:
        for kernel, real in saved:
            kernel.run = real
