"""Inclusive prefix sums along the last dim, one program per row: a row's sums have the same bits
whatever else the batch holds.

The sampler's top-p keeps the tokens whose cumulative probability (ascending sort) passes
1 - top_p. On CUDA torch.cumsum picks its scan by shape: cub's device-wide scan for one row, a
block scan whose width depends on the number of rows otherwise (ATen ScanUtils.cuh). A row's
partial sums then change in the last bits with the batch size, and a token right at the threshold
can be kept alone and dropped in a batch. Here each program walks its own row in BLOCK-wide tiles:
tl.cumsum inside a tile (a fixed tree for the constexpr BLOCK), plus the running total, carried in
fp32 as the previous tile's last partial sum. Which numbers are added, and in what order, depends
on V and BLOCK only. fp32 in, fp32 out; grid (B,). The CPU keeps torch.cumsum (sequential, in
double, per row: batch-invariant already).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024   # one tile per loop step: 4 KB of fp32, 8 elements per thread at 4 warps


@triton.jit
def _row_cumsum_kernel(x_ptr, out_ptr, V, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    carry = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0)
        sums = tl.cumsum(x, 0) + carry
        tl.store(out_ptr + row * stride_o + start + cols, sums, mask=mask)
        # The tile's last partial sum, exactly (adding zeros is exact); masked tail columns add 0.
        carry = tl.sum(tl.where(cols == BLOCK - 1, sums, 0.0), 0)


def row_cumsum_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.cumsum(x, dim=-1, out=out)


def row_cumsum(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, V) fp32, contiguous last dim → out (B, V) fp32 (`out` if given, else new): the
    inclusive prefix sums of each row, batch-invariant (see the module doc)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be (B, V) float32, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or (
            x.shape[1] > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be {tuple(x.shape)} float32 on {x.device}, contiguous in its "
                         f"last dim, got {tuple(out.shape)} {out.dtype} on {out.device}")
    B, V = x.shape
    if B and V:
        _row_cumsum_kernel[(B,)](x, out, V, x.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out
