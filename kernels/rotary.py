"""Rotary position embedding, rotate-half (NeoX / Llama) layout, applied to q and k in place.

    inv_freq[i] = 1 / theta^(2i / D)                (fp32)
    cos, sin    = cos/sin(cat(pos * inv_freq, pos * inv_freq))   (fp32, then cast to model dtype)
    x'          = x * cos + rotate_half(x) * sin    (model dtype); rotate_half(x) = cat(-x2, x1)

The cos/sin table is computed once per position in fp32 and cast, matching transformers'
LlamaRotaryEmbedding rounding points. Shapes: q (N, H, D), k (N, KVH, D), cos/sin (N, D).
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # Same expression as transformers (int64 arange → float, then pow) so inv_freq is bit-identical.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (N, D) in `dtype` for integer positions (N,)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                          # (N, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k in place; returns them."""
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    q.copy_(q * c + _rotate_half(q) * s)
    k.copy_(k * c + _rotate_half(k) * s)
    return q, k
