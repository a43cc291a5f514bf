"""RMSNorm, optionally fused with the residual add that precedes it (Llama pre-norm blocks).

    residual_out = x + residual            (model dtype, as transformers adds residuals)
    out = weight * (r.float() * rsqrt(mean(r.float()^2) + eps)).to(dtype)

The normalised value is rounded to the model dtype BEFORE the weight multiply, exactly as
transformers' LlamaRMSNorm does (llava-reference.md §6); keeping that rounding point is what keeps
greedy tokens identical in bf16. Shapes: x, residual (N, H); weight (H,).

The Triton kernel keeps all three rounding points of the reference: r = x + residual rounded to
the dtype (and stored as residual_out); the variance in fp32 from that rounded r; normed rounded
to the dtype; then weight * normed as one fp32 multiply of two dtype values, rounded (what torch
does for a half-precision mul). It differs from the reference only in rsqrt's implementation and
the order of the fp32 sum of squares. One program per row: the whole row (H <= MAX_HIDDEN) sits
in registers, so x and residual are read once and out/residual_out written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastllava.kernels.common import FP_FUSION

MAX_HIDDEN = 32768  # one row per program must fit in registers (Llama-family hidden <= 8192)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_res, H, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 at long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The sum of two dtype values is formed in fp32 and rounded once, as torch's add does.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)  # masked lanes are 0 and add nothing to the sum of squares
    var = tl.sum(xf * xf, axis=0) / H
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)  # rounding point of LlamaRMSNorm
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * H + cols, out, mask=mask)


def _num_warps(block: int) -> int:
    # Enough threads that each holds <= 16-32 fp32 values of the row: no register spills at 8192.
    if block >= 16384:
        return 16
    if block >= 2048:
        return 8
    return 4 if block >= 512 else 2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_ref`: returns (out, residual_out), both new (N, H) tensors
    when residual is given; residual_out is x itself when residual is None (as in the ref).

    x (N, H) and residual (N, H) may have any row stride but a contiguous last dim;
    weight (H,) contiguous, all in one floating dtype on one device.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, H), got shape {tuple(x.shape)}")
    N, H = x.shape
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if H > MAX_HIDDEN:
        raise ValueError(f"x: hidden size {H} exceeds MAX_HIDDEN={MAX_HIDDEN} (one row per program)")
    if x.stride(1) != 1 and H > 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    if weight.shape != (H,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be ({H},) {x.dtype} on {x.device}, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    weight = weight.contiguous()
    if residual is not None:
        if (residual.shape != x.shape or residual.dtype != x.dtype
                or residual.device != x.device):
            raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype} on {x.device}, got "
                             f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
        if residual.stride(1) != 1 and H > 1:
            raise ValueError(f"residual must be contiguous in its last dim, got strides "
                             f"{residual.stride()}")
    out = torch.empty((N, H), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if N == 0 or H == 0:
        return out, res_out
    BLOCK = triton.next_power_of_2(H)
    _rms_norm_kernel[(N,)](
        x, residual if residual is not None else x, weight, out, res_out,
        x.stride(0), residual.stride(0) if residual is not None else 0, H, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=_num_warps(BLOCK),
        enable_fp_fusion=FP_FUSION)
    return out, res_out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, residual_out); residual_out is x + residual, or x when residual is None."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x
