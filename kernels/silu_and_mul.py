"""SiLU-gated MLP activation on the fused gate/up projection output.

    out = silu(x[:, :I]) * x[:, I:]        (model dtype, as transformers' LlamaMLP)
Shapes: x (N, 2I) → out (N, I). The gate half comes first (gate_up_proj = cat(gate, up)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
