"""fastllava.kernels: one op per file — a Triton kernel, its launcher, and its plain-torch `_ref`.

Triton decides at `@triton.jit` time whether a kernel is compiled for the GPU or interpreted on
the CPU (TRITON_INTERPRET). Without CUDA it can only interpret, so on such machines this package
turns the interpreter on before any kernel module is imported; `backend="triton"` then runs the
very same kernels on CPU tensors (slowly: that is how CI proves them inside the real model).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
