"""Megatron-style tensor parallelism of the decoder (Shoeybi et al. 2019, §3).

Per layer, rank r of N holds:
  qkv_proj      column-parallel: heads [r*H/N, (r+1)*H/N) of q and KV heads [r*KVH/N, ...) of k, v
  o_proj        row-parallel: the matching input columns; its partial sums are all-reduced (1)
  gate_up_proj  column-parallel: intermediate rows [r*I/N, (r+1)*I/N) of gate and of up
  down_proj     row-parallel: the matching columns; all-reduced (2)
so attention and the MLP run on local heads / rows with no communication, and each layer costs two
all-reduces of (N_tokens, hidden). The KV cache holds only the rank's KV heads.

Embedding and lm_head are vocab-parallel: rank r holds vocab rows [r*c, (r+1)*c), c = ceil(V/N).
The embedding looks up the ids it owns (zeros elsewhere) and all-reduces (exact: one non-zero term
per element); lm_head computes its columns of the logits and all-gathers them (B x V, small). At
34B (V 64000 x 7168, bf16) each of the two tables is 0.92 GB: replicating lm_head would add 0.92
GB to every GPU's per-token weight reads (34 GB per rank at TP=2, +2.7%), so it is split too.

The vision tower and projector run on rank 0 only and their features reach the other ranks in the
step descriptor (runtime/tp_step.py), decided by cost at real shapes (LLaVA-v1.6-34B, bf16):
  tower + projector for a 5-tile anyres image: CLIP ViT-L/14-336 (0.3 B params) over 5 x 577
  tokens ≈ 2 x 0.3e9 x 2885 ≈ 1.8 TFLOP, projector (1024→7168→7168) over 2885 rows ≈ 0.34 TFLOP:
  ~2.1 TFLOP, ~4 ms on an H100 at ~50 % of bf16 peak;
  broadcasting the features instead: 2928 tokens x 7168 x 2 B = 42 MB, ~0.1-0.3 ms over NVLink
  (150-450 GB/s), ~1.7 ms over PCIe 4 (25 GB/s);
  the decoder prefill of those ~3000 tokens: 2 x 34e9 x 3000 / 2 ranks ≈ 100 TFLOP per rank,
  ≳ 100 ms.
Replication would save the broadcast (≤ 0.3 % of TTFT on NVLink) but cost a tower, a projector
(0.6 GB) and an image-feature cache on every rank, and ship the pixels instead (3.4 MB); rank 0 +
broadcast keeps the image path (feature LRU, batching of tiles) in one process, and the features
ride in the one step descriptor the ranks receive anyway.

`shard_decoder` rebuilds the modules in place (on the meta device, before allocation); `TensorShard`
(weights/sharding.py) on each module tells the loader which slice of the checkpoint tensor to read.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.config import TextConfig
from fastllava.models.layers import MergedLinear
from fastllava.weights.sharding import TensorShard


class TensorParallelError(ValueError):
    """The model cannot be split this way (counts that don't divide, an unsupported feature)."""


@dataclasses.dataclass(eq=False)
class TensorParallel:
    """This process's place in the group; `comm` (runtime/tp_comm.TPComm) is attached once the
    ranks have met, before the first forward (loading needs only rank and world)."""
    rank: int
    world: int
    comm: object | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t)

    def all_gather_last(self, t: torch.Tensor, full: int) -> torch.Tensor:
        return self.comm.all_gather_last(t, full)


def check_divisible(c: TextConfig, world: int) -> None:
    """Refuse, naming the counts, a split that would leave ranks with unequal heads or rows."""
    if world < 1:
        raise TensorParallelError(f"tensor_parallel_size must be >= 1, got {world}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(c, name)
        if n % world:
            raise TensorParallelError(
                f"tensor_parallel_size {world} does not divide the model's {name} ({n}): "
                f"every rank must hold the same number of heads/rows; use a size that divides "
                f"num_attention_heads ({c.num_attention_heads}), num_key_value_heads "
                f"({c.num_key_value_heads}) and intermediate_size ({c.intermediate_size})")


def local_text_config(c: TextConfig, world: int) -> TextConfig:
    """The per-rank view the KV cache is sized with (KVH/N heads per layer)."""
    return dataclasses.replace(c, num_attention_heads=c.num_attention_heads // world,
                               num_key_value_heads=c.num_key_value_heads // world)


class ColumnParallelLinear(MergedLinear):
    """A (fused) projection whose output rows are split: each part's rows [r*c, (r+1)*c)."""

    def __init__(self, in_features: int, full_sizes: tuple[int, ...], tp: TensorParallel):
        shard = TensorShard(0, tp.rank, tp.world, tuple(full_sizes))
        super().__init__(in_features, shard.local_sizes(), bias=False)
        self.tp_shard = shard


class RowParallelLinear(nn.Linear):
    """A projection whose input columns are split; the partial products are summed across ranks
    (fp32 on CPU sums in a different order than one GEMM: logits move by rounding, not more)."""

    def __init__(self, full_in: int, out_features: int, tp: TensorParallel):
        shard = TensorShard(1, tp.rank, tp.world, (full_in,))
        super().__init__(shard.local_sizes()[0], out_features, bias=False)
        self.tp_shard, self.tp = shard, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp_shard, self.tp = TensorShard(0, tp.rank, tp.world, (vocab,)), tp
        self.lo, self.hi = self.tp_shard.bounds(vocab)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) → (N, hidden): own rows looked up, others zero, summed over ranks."""
        owned = (ids >= self.lo) & (ids < self.hi)
        local = torch.where(owned, ids - self.lo, 0)
        out = F.embedding(local, self.weight).masked_fill(~owned[:, None], 0)
        return self.tp.all_reduce(out)


class VocabParallelLMHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, tp: TensorParallel):
        super().__init__()
        self.tp_shard, self.tp, self.vocab = TensorShard(0, tp.rank, tp.world, (vocab,)), tp, vocab
        self.weight = nn.Parameter(torch.empty(self.tp_shard.local_sizes()[0], hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, hidden) → logits (B, V), every rank's columns gathered on every rank."""
        return self.tp.all_gather_last(F.linear(x, self.weight), self.vocab)


def shard_decoder(llava: nn.Module, tp: TensorParallel) -> None:
    """Replace the decoder's linears, embedding and lm_head by this rank's shards (call it on
    the meta device, before allocation); attention modules are told their local head counts."""
    c: TextConfig = llava.config.text
    check_divisible(c, tp.world)
    if c.qkv_bias:   # ColumnParallelLinear shards weights only
        raise TensorParallelError(f"tensor parallelism of a {c.model_type} decoder (q/k/v "
                                  "biases) is not supported yet: use tensor_parallel_size 1")
    lm = llava.language_model
    lm.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = ColumnParallelLinear(c.hidden_size, (c.q_size, c.kv_size, c.kv_size), tp)
        attn.o_proj = RowParallelLinear(c.q_size, c.hidden_size, tp)
        attn.num_heads, attn.num_kv_heads = (c.num_attention_heads // tp.world,
                                             c.num_key_value_heads // tp.world)
        attn.splits = attn.qkv_proj.output_sizes
        mlp.gate_up_proj = ColumnParallelLinear(c.hidden_size, (c.intermediate_size,) * 2, tp)
        mlp.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, tp)
    llava.lm_head = VocabParallelLMHead(c.hidden_size, c.vocab_size, tp)
