"""The GELU family used by the vision towers and the projector, in the model dtype.

- "quick": CLIP's quick_gelu, x * sigmoid(1.702 x)
- "tanh":  SigLIP's gelu_pytorch_tanh, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
- "erf":   exact GELU (the mlp2x_gelu projector; NOT the tanh approximation)
Shape: any; elementwise.

Rounding points of the Triton kernel follow the reference: "quick" is three torch ops, so
1.702 x, the sigmoid and the product are each computed in fp32 and rounded to the dtype;
"tanh" and "erf" are single torch ops that compute in fp32 and round once. "tanh" uses the
identity 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)) (Triton has no portable tanh): the same
function, differing from torch only in the transcendental, and free of torch's cancellation in
1 + tanh(u) for negative u. The kernel runs over a flat contiguous view in blocks of BLOCK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastllava.kernels.common import FP_FUSION

VARIANTS = ("quick", "tanh", "erf")  # the kernel's VARIANT constexpr is an index into this
BLOCK = 1024  # elements per program: 2 KB of bf16, 8 per thread at 4 warps (16-byte accesses)


# numel (tokens x width) changes per step: specialized, it would compile new variants mid-traffic.
@triton.jit(do_not_specialize=["numel"])
def _gelu_kernel(x_ptr, out_ptr, numel, VARIANT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    if VARIANT == 0:    # quick: x * sigmoid(1.702 x), three rounded torch ops
        t = (xf * 1.702).to(dt).to(tl.float32)
        sig = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
        out = xf * sig
    elif VARIANT == 1:  # tanh: x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)
        out = xf / (1.0 + tl.exp(-2.0 * u))  # u -> -inf: x / inf = -0, no NaN
    else:               # erf: x * 0.5 * (1 + erf(x / sqrt(2))), torch's expression
        out = xf * 0.5 * (1.0 + tl.math.erf(xf * 0.7071067811865476))
    tl.store(out_ptr + offs, out.to(dt), mask=mask)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Triton version of `gelu_ref`: x of any shape and floating dtype (made contiguous if it is
    not) → new contiguous tensor of the same shape and dtype. approximate: quick, tanh or erf."""
    if approximate not in VARIANTS:
        raise ValueError(f"unknown gelu variant {approximate!r} (quick, tanh, erf)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    _gelu_kernel[(triton.cdiv(x.numel(), BLOCK),)](
        x, out, x.numel(), VARIANT=VARIANTS.index(approximate), BLOCK_SIZE=BLOCK, num_warps=4,
        enable_fp_fusion=FP_FUSION)
    return out


ACTIVATIONS = {"quick_gelu": "quick", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}


def gelu_ref(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    if approximate == "tanh":
        return F.gelu(x, approximate="tanh")
    if approximate == "erf":
        return F.gelu(x)
    raise ValueError(f"unknown gelu variant {approximate!r} (quick, tanh, erf)")
