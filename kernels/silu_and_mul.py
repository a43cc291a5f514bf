"""SiLU-gated MLP activation on the fused gate/up projection output.

    out = silu(x[:, :I]) * x[:, I:]        (model dtype, as transformers' LlamaMLP)
Shapes: x (N, 2I) → out (N, I). The gate half comes first (gate_up_proj = cat(gate, up)).

The Triton kernel keeps the reference's two rounding points: silu(gate) = g / (1 + exp(-g)) is
computed in fp32 and rounded to the dtype (as F.silu does for half types), then multiplied by up
in fp32 and rounded. Only exp's implementation differs from torch. Grid (N, I / BLOCK).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastllava.kernels.common import FP_FUSION

MAX_BLOCK = 1024  # columns per program: 2 KB of bf16 per operand, 8 elements per thread at 4 warps


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 for long prefills
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # large negative g: g / inf = -0, no NaN
    out = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + row * I + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`: x (N, 2I), any row stride, contiguous last dim,
    floating dtype → new contiguous out (N, I) in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, 2I), got shape {tuple(x.shape)}")
    if x.shape[1] % 2:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {x.shape[1]}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    N, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((N, I), dtype=x.dtype, device=x.device)
    if N == 0 or I == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(I))
    _silu_and_mul_kernel[(N, triton.cdiv(I, block))](x, out, x.stride(0), I, BLOCK=block,
                                                     num_warps=4 if block >= 512 else 2,
                                                     enable_fp_fusion=FP_FUSION)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
