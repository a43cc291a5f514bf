"""Small building blocks shared by the towers and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """Several projections of the same input fused into one GEMM (q/k/v, gate/up).

    `output_sizes` tells the weight loader where each checkpoint tensor goes: shard j fills rows
    [sum(sizes[:j]), sum(sizes[:j+1])) of weight (and bias).
    """

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, ops, x: torch.Tensor, residual: torch.Tensor | None = None):
        """(normed, residual_out): the residual add is fused into the norm (see kernels/rms_norm)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)
