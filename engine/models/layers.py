"""Small building blocks shared by the towers and the decoder."""

from __future__ import annotations

import torch
from torch import nn

from fastllava.kernels.fp8_linear import FP8_DTYPE, fp8_linear
from fastllava.kernels.rotary import rope_cos_sin, rope_inv_freq


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


class RotaryTable(nn.Module):
    """cos and sin (max_positions, D) of every position, in the model dtype, built once at load;
    the decoder's rotary kernel gathers rows by position (kernels/rotary_write_kv).

    Built with transformers' LlamaRotaryEmbedding rounding points: inv_freq in fp32 on the CPU,
    pos * inv_freq and cos/sin in fp32 on the model's device, one cast to the model dtype. Each
    element depends only on its own position, so a row of the table has the bits a per-step
    computation at that position would have."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self):
        """Fill the tables on their device in their dtype (after `to(dtype)` and `to_empty`)."""
        positions = torch.arange(self.cos.shape[0], device=self.cos.device)
        inv_freq = rope_inv_freq(self.head_dim, self.theta).to(self.cos.device)
        self.cos, self.sin = rope_cos_sin(positions, inv_freq, self.cos.dtype)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight is float8_e4m3fn with one fp32 scale per output channel
    (kernels/fp8_linear: activations are quantized per token at each call).

    `weight_scale` (out, 1) is a parameter so the strict loader fills and checks it like any
    other; a fused projection keeps `output_sizes`, which then applies to both (per-channel
    scales fuse by concatenating rows)."""

    def __init__(self, in_features: int, out_features: int,
                 output_sizes: tuple[int, ...] | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE,
                                               device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32,
                                                     device=device), requires_grad=False)
        if output_sizes is not None:
            self.output_sizes = tuple(output_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale)


def use_fp8_linears(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` (the decoder) by an Fp8Linear of the same shape on
    the same device; returns how many. Call it after casting the model to its dtype (the cast
    would turn FP8 weights and fp32 scales into the model dtype) and before allocating it."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child.bias is not None:
                raise ValueError(f"{name}: FP8 linear layers have no bias")
            setattr(parent, name, Fp8Linear(child.in_features, child.out_features,
                                            getattr(child, "output_sizes", None),
                                            device=child.weight.device))
            count += 1
    return count
