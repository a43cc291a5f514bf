"""Which part of a checkpoint tensor a tensor-parallel rank holds, and reading only that part.

A sharded parameter's module carries `tp_shard` (a `TensorShard`): the dimension split across
ranks (0: output rows — column-parallel linears, vocab-parallel embedding / lm_head; 1: input
columns — row-parallel linears) and the full extent of that dimension per fused part (q, k, v or
gate, up; one entry when not fused). Rank r holds rows [r*c, min(full, (r+1)*c)) of every part,
c = ceil(full / world), and its parameter is those parts concatenated.

The loader reads a rank's part with `safe_open(...).get_slice(key)[lo:hi]` (or `[:, lo:hi]`): the
slice is cut out of the memory map, so a rank never materialises a tensor row it does not own.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TensorShard:
    dim: int                      # 0: rows, 1: columns
    rank: int
    world: int
    full_sizes: tuple[int, ...]   # full extent of `dim` of each fused part (one when not fused)

    def bounds(self, full: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a dimension of extent `full` (the last rank may hold fewer)."""
        step = -(-full // self.world)
        lo = min(full, self.rank * step)
        return lo, min(full, lo + step)

    def local_sizes(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in map(self.bounds, self.full_sizes))

    def full_shape(self, local_shape: tuple[int, ...], part: int | None) -> tuple[int, ...]:
        """The checkpoint shape of fused part `part` (None: all parts, a pre-fused tensor)."""
        full = sum(self.full_sizes) if part is None else self.full_sizes[part]
        return local_shape[:self.dim] + (full,) + local_shape[self.dim + 1:]

    def pieces(self, part: int | None) -> tuple[tuple[int, int], ...]:
        """[lo, hi) ranges of the checkpoint tensor along `dim` this rank reads, in order."""
        parts = range(len(self.full_sizes)) if part is None else (part,)
        out = []
        for j in parts:
            offset = sum(self.full_sizes[:j]) if part is None else 0
            lo, hi = self.bounds(self.full_sizes[j])
            out.append((offset + lo, offset + hi))
        return tuple(out)

    def read(self, f, key: str, part: int | None) -> torch.Tensor:
        """This rank's rows/columns of checkpoint tensor `key` from an open safetensors file."""
        view = f.get_slice(key)
        chunks = [view[lo:hi] if self.dim == 0 else view[:, lo:hi] for lo, hi in self.pieces(part)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=self.dim)


def tensor_shards(model: torch.nn.Module) -> dict[str, TensorShard]:
    """Parameter name → its TensorShard, for the `weight` of every module that has `tp_shard`."""
    return {f"{name}.weight" if name else "weight": module.tp_shard
            for name, module in model.named_modules() if getattr(module, "tp_shard", None)}
