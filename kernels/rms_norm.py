"""RMSNorm, optionally fused with the residual add that precedes it (Llama pre-norm blocks).

    residual_out = x + residual            (model dtype, as transformers adds residuals)
    out = weight * (r.float() * rsqrt(mean(r.float()^2) + eps)).to(dtype)

The normalised value is rounded to the model dtype BEFORE the weight multiply, exactly as
transformers' LlamaRMSNorm does (llava-reference.md §6); keeping that rounding point is what keeps
greedy tokens identical in bf16. Shapes: x, residual (N, H); weight (H,).
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, residual_out); residual_out is x + residual, or x when residual is None."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x
