"""The GELU family used by the vision towers and the projector, in the model dtype.

- "quick": CLIP's quick_gelu, x * sigmoid(1.702 x)
- "tanh":  SigLIP's gelu_pytorch_tanh, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
- "erf":   exact GELU (the mlp2x_gelu projector; NOT the tanh approximation)
Shape: any; elementwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"quick_gelu": "quick", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}


def gelu_ref(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    if approximate == "tanh":
        return F.gelu(x, approximate="tanh")
    if approximate == "erf":
        return F.gelu(x)
    raise ValueError(f"unknown gelu variant {approximate!r} (quick, tanh, erf)")
