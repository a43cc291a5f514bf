"""Kernel tests may define their own probe kernels: triton.language must be imported after
fastllava.kernels has chosen compiled or interpreted mode (TRITON_INTERPRET, automatic without
CUDA), or its built-ins (tl.zeros, tl.cdiv) stay compiled-only and fail in the interpreter."""

import fastllava.kernels  # noqa: F401
