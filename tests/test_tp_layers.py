"""The parallel layers against their unsplit selves, with 3 ranks as threads of this process on
real gloo groups (one HashStore): a vocab (10) that 3 does not divide — the last rank holds 2
rows and its logits are padded for the all-gather and cut after — and row-parallel sums."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastllava.models.parallel import (RowParallelLinear, TensorParallel, VocabParallelEmbedding,
                                       VocabParallelLMHead)
from fastllava.runtime.tp_comm import TPComm

WORLD, VOCAB, HIDDEN, INNER = 3, 10, 4, 6


def _on_ranks(fn) -> list:
    """fn(tp) on WORLD ranks at once (threads); their results by rank."""
    store, out, errors = dist.HashStore(), [None] * WORLD, []

    def rank(r):
        try:
            tp = TensorParallel(r, WORLD, TPComm(store, r, WORLD, torch.device("cpu"), 30))
            out[r] = fn(tp)
        except Exception as e:   # surfaced below, not lost in the thread
            errors.append(e)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def test_vocab_parallel_embedding_and_lm_head_uneven():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, HIDDEN, generator=g)
    ids = torch.tensor([0, 3, 4, 7, 8, 9, 9, 2])
    x = torch.randn(5, HIDDEN, generator=g)

    def run(tp):
        emb, head = VocabParallelEmbedding(VOCAB, HIDDEN, tp), VocabParallelLMHead(HIDDEN, VOCAB, tp)
        rows = slice(*emb.tp_shard.bounds(VOCAB))
        with torch.no_grad():
            emb.weight.copy_(table[rows])
            head.weight.copy_(table[rows])
            return emb.weight.shape[0], emb(ids), head(x)
    results = _on_ranks(run)
    assert [r[0] for r in results] == [4, 4, 2]
    for _, embeds, logits in results:   # every rank ends with the full result
        assert torch.equal(embeds, F.embedding(ids, table))   # one non-zero term: exact
        assert logits.shape == (5, VOCAB)
        torch.testing.assert_close(logits, x @ table.T, rtol=0, atol=1e-6)


def test_row_parallel_linear_sums_the_ranks():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(HIDDEN, INNER, generator=g), torch.randn(5, INNER, generator=g)

    def run(tp):
        lin = RowParallelLinear(INNER, HIDDEN, tp)
        cols = slice(*lin.tp_shard.bounds(INNER))
        with torch.no_grad():
            lin.weight.copy_(w[:, cols])
            return lin(x[:, cols])
    for out in _on_ranks(run):
        torch.testing.assert_close(out, x @ w.T, rtol=1e-6, atol=1e-6)
