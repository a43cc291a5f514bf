"""Llama-family decoder (Vicuna, Mistral without sliding window, Yi, Qwen2) over a paged KV cache.

Per layer: h = x + o_proj(attn(RMSNorm(x)));  x = h + down(silu(gate(n)) * up(n)), n = RMSNorm(h).
q/k/v and gate/up are fused GEMMs; the residual add is fused into the following RMSNorm. Tokens
of all sequences in a step are packed along N (no padding); `ForwardContext` says where each one
lives in the paged cache and whether this is a prefill (varlen attention) or a decode step.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.config import TextConfig
from fastllava.kv_cache import LayerKV
from fastllava.models.context import ForwardContext
from fastllava.models.layers import MergedLinear, RMSNorm, RotaryTable


class LlamaAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.qkv_proj = MergedLinear(c.hidden_size, (c.q_size, c.kv_size, c.kv_size),
                                     bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=False)
        self.splits = (c.q_size, c.kv_size, c.kv_size)

    def forward(self, ops, x, ctx: ForwardContext, rope: RotaryTable, kv: LayerKV):
        N = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.reshape(N, self.num_heads, self.head_dim)      # (N, H, D)
        k = k.reshape(N, self.num_kv_heads, self.head_dim)   # (N, KVH, D)
        v = v.reshape(N, self.num_kv_heads, self.head_dim)
        # q and k rotated in place (cos/sin rows by position), k and v written to their slots
        # (quantized there when the cache is fp8; k and v themselves keep the model dtype).
        scales = dict(k_scale=kv.k_scale, v_scale=kv.v_scale)
        ops.rotary_write_kv(q, k, v, ctx.positions, rope.cos, rope.sin, kv.k, kv.v,
                            ctx.slot_mapping, **scales)
        scale = self.head_dim ** -0.5
        if ctx.is_prefill and ctx.has_prefix:   # some sequence attends to cached tokens too
            o = ops.prefill_attention(q, k, v, ctx.cu_seqlens, causal=True, scale=scale,
                                      k_cache=kv.k, v_cache=kv.v, block_tables=ctx.block_tables,
                                      prefix_lens=ctx.prefix_lens, decode_rows=ctx.decode_rows,
                                      **scales)
        elif ctx.is_prefill:                    # the cheaper kernel variant: new tokens only
            o = ops.prefill_attention(q, k, v, ctx.cu_seqlens, causal=True, scale=scale)
        else:
            o = ops.paged_decode_attention(q, kv.k, kv.v, ctx.block_tables, ctx.context_lens,
                                           scale=scale, **scales)
        return self.o_proj(o.reshape(N, -1))


class LlamaMLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(c.hidden_size, (c.intermediate_size,) * 2, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, ops, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, ops, x, residual, ctx, rope, kv: LayerKV):
        h, residual = self.input_layernorm(ops, x, residual)
        x = self.self_attn(ops, h, ctx, rope, kv)
        h, residual = self.post_attention_layernorm(ops, x, residual)
        return self.mlp(ops, h), residual


class LlamaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # Positions never pass max_position_embeddings (runtime/build.py caps max_len there).
        self.rope = RotaryTable(c.head_dim, c.rope_theta, c.max_position_embeddings)

    def reset_buffers(self):
        """Recompute non-checkpoint buffers after `to_empty` (the model is built on the meta device)."""
        self.rope.reset_buffers()

    def forward(self, ops, embeds: torch.Tensor, ctx: ForwardContext, kv_cache) -> torch.Tensor:
        """embeds (N, hidden) → final hidden states (N, hidden)."""
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(ops, x, residual, ctx, self.rope, kv_cache.layer(i))
        return self.norm(ops, x, residual)[0]
