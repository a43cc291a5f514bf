"""Where kernel tests put their tensors: where this process's kernels run.

Triton builds every kernel for one mode at import (kernels/__init__.py): compiled for CUDA, or
interpreted on the CPU (TRITON_INTERPRET, automatic without CUDA). The same CPU-sized sweeps thus
run on the GPU machine too; bf16 and real-shape cases are separate `gpu` tests.
"""

from fastllava.kernels.common import interpreted

DEVICE = "cpu" if interpreted() else "cuda"
