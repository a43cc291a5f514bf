"""The model runner: scheduled sequences → packed tensors → one forward → sampled tokens.

Each step rebuilds the flat inputs from the sequences (the source of truth):
- prefill / mixed steps: the chunks of all sequences packed along N (decodes ride along as 1-token
  chunks with their whole context as cached prefix), varlen attention over cu_seqlens with the
  cached prefix read through the block tables;
- decode steps: one token per sequence, paged decode attention, replayed from a CUDA graph when
  the runner has them (`DecodeGraphs`).
Image features for chunks that touch an image come from the feature LRU or from one vision-tower
run over all new images of the step (all tiles of all requests in one batch). Sampling happens on
the device; the only host sync per step is reading the B sampled ids back.
"""

from __future__ import annotations

import torch

from fastllava.kv_cache import KVCache
from fastllava.models.context import ForwardContext
from fastllava.preprocess.processor import ProcessedImage
from fastllava.runtime.cuda_graphs import DecodeGraphs
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.memory_plan import MemoryPlan
from fastllava.runtime.sampler import SamplingBatch, raw_logprobs, sample
from fastllava.runtime.scheduler import Batch
from fastllava.runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, model, ops, kv: KVCache, image_cache: ImageFeatureCache,
                 graphs: DecodeGraphs | None = None, memory_plan: MemoryPlan | None = None):
        self.model, self.ops, self.kv = model, ops, kv
        self.memory_plan = memory_plan     # how the KV pool was sized (stats())
        self.device = kv.k[0].device
        self.image_cache = image_cache
        self.graphs = graphs
        self._features: dict[int, list[torch.Tensor | None]] = {}   # seq_id → per-image features

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[int | None]:
        """One step; the sampled token of each seq that reached its last token, else None."""
        samples = batch.samples
        if batch.is_decode:
            logits = self._decode(batch.seqs)
        else:
            logits = self._prefill(batch, samples)
        picked = [seq for seq, s in zip(batch.seqs, samples) if s]
        if not picked:
            return [None] * len(batch.seqs)
        rows = [(seq.params.temperature, seq.params.top_p, seq.params.seed, seq.num_generated)
                for seq in picked]
        sampled = sample(logits, SamplingBatch.build(rows, self.device))
        if any(seq.params.logprobs is not None for seq in picked):   # only when a request asks
            self._record_logprobs(picked, logits, sampled)
        tokens = iter(sampled.tolist())
        return [next(tokens) if s else None for s in samples]

    @staticmethod
    def _record_logprobs(picked: list[Sequence], logits: torch.Tensor, sampled: torch.Tensor
                         ) -> None:
        """Append (logprob, top-k) of each sampled token to the seqs that asked (raw_logprobs),
        computed over their rows only."""
        asked = [i for i, seq in enumerate(picked) if seq.params.logprobs is not None]
        top_k = max(picked[i].params.logprobs for i in asked)
        rows = torch.tensor(asked, dtype=torch.int64, device=logits.device)
        chosen, values, ids = (t.tolist() for t in raw_logprobs(logits[rows], sampled[rows], top_k))
        for j, i in enumerate(asked):
            k = picked[i].params.logprobs
            picked[i].logprobs.append((chosen[j], list(zip(ids[j][:k], values[j][:k]))))

    def release(self, seq: Sequence) -> None:
        """Drop what the runner holds for seq (its image features)."""
        self._features.pop(seq.seq_id, None)

    # ---- prefill and mixed steps --------------------------------------------------------------
    def _prefill(self, batch: Batch, samples: list[bool]) -> torch.Tensor:
        S = self.kv.page_size
        ids, positions, slots, is_image, feats = [], [], [], [], []
        cu_seqlens, logits_rows = [0], []
        for seq, start, n, s in zip(batch.seqs, batch.starts, batch.num_tokens, samples):
            end = start + n
            bt = seq.block_table
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [bt[t // S] * S + t % S for t in range(start, end)]
            flags = [False] * n
            for j, img in enumerate(seq.images):
                lo, hi = max(start, img.start), min(end, img.end)
                if lo < hi:
                    flags[lo - start:hi - start] = [True] * (hi - lo)
                    feats.append(self._image_features(seq, j, batch)[lo - img.start:hi - img.start])
            is_image += flags
            cu_seqlens.append(cu_seqlens[-1] + n)
            if s:
                logits_rows.append(cu_seqlens[-1] - 1)
        # Scored prompt positions (LLaVA.score) add rows after the sampling rows; none otherwise.
        scored = self._scored_rows(batch, cu_seqlens)
        logits_rows += [row for row, _, _ in scored]
        ctx = self._context(True, batch.seqs, positions, slots, cu_seqlens, batch.starts,
                            [s + n for s, n in zip(batch.starts, batch.num_tokens)], logits_rows)
        i64 = dict(dtype=torch.int64, device=self.device)
        ids_t = torch.tensor(ids, **i64)
        mask = torch.tensor(is_image, dtype=torch.bool, device=self.device) if feats else None
        embeds = self.model.embed(ids_t, mask, torch.cat(feats) if feats else None)
        logits = self.model(self.ops, embeds, ctx, self.kv)
        if scored:
            logits = self._record_prompt_logprobs(scored, logits)
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens):
            if all(start + n >= img.end for img in seq.images):
                self.release(seq)            # past its images: their features are no longer needed
        return logits

    @staticmethod
    def _scored_rows(batch: Batch, cu_seqlens: list[int]) -> list[tuple[int, Sequence, int]]:
        """(packed row, seq, position p) for each prompt position p >= prompt_logprobs_from
        whose predecessor p - 1 this step computes: row p - 1's logits score token p."""
        out = []
        for i, (seq, start, n) in enumerate(zip(batch.seqs, batch.starts, batch.num_tokens)):
            first = seq.params.prompt_logprobs_from
            if first is None:
                continue
            for t in range(max(start, first - 1), min(start + n, seq.prompt_len - 1)):
                out.append((cu_seqlens[i] + t - start, seq, t + 1))
        return out

    @staticmethod
    def _record_prompt_logprobs(scored, logits: torch.Tensor) -> torch.Tensor:
        """Store the scored positions' log-probabilities; return the sampling rows' logits."""
        n = logits.shape[0] - len(scored)
        targets = torch.tensor([seq.token_ids[p] for _, seq, p in scored], dtype=torch.int64,
                               device=logits.device)
        values, _, top = raw_logprobs(logits[n:], targets, 1)
        for (_, seq, p), value, best in zip(scored, values.tolist(), top[:, 0].tolist()):
            seq.prompt_logprobs[p] = (value, best)
        return logits[:n]

    def _image_features(self, seq: Sequence, j: int, batch: Batch) -> torch.Tensor:
        held = self._features.get(seq.seq_id)
        if held is None or held[j] is None:
            self._encode_new_images(batch)
        return self._features[seq.seq_id][j]

    def _encode_new_images(self, batch: Batch) -> None:
        """Fill features for every image this step touches: LRU hits first, then one tower run
        over all missing images (each distinct image once, however many requests share it)."""
        todo: dict[bytes, ProcessedImage] = {}
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens):
            held = self._features.setdefault(seq.seq_id, [None] * len(seq.images))
            for j, img in enumerate(seq.images):
                if held[j] is None and img.start < start + n and start < img.end:
                    held[j] = self.image_cache.get(img.content_hash)
                    if held[j] is None:
                        todo[img.content_hash] = seq.payload[j]
        if todo:
            images = list(todo.values())
            feats = self.model.encode_images(
                self.ops, [im.pixel_values.to(self.device) for im in images],
                [im.image_size for im in images], [im.grid for im in images])
            new = dict(zip(todo, feats))
            for key, f in new.items():
                self.image_cache.put(key, f, f.shape[0])
            for seq in batch.seqs:
                held = self._features[seq.seq_id]
                for j, img in enumerate(seq.images):
                    if held[j] is None and img.content_hash in new:
                        held[j] = new[img.content_hash]

    # ---- decode steps -------------------------------------------------------------------------
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        S = self.kv.page_size
        positions = [len(seq) - 1 for seq in seqs]
        ids = [seq.token_ids[-1] for seq in seqs]
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch_size:
            return self.graphs.run(ids, positions, [seq.block_table for seq in seqs])
        slots = [seq.block_table[p // S] * S + p % S for seq, p in zip(seqs, positions)]
        ctx = self._context(False, seqs, positions, slots, list(range(len(seqs) + 1)),
                            positions, [p + 1 for p in positions], list(range(len(seqs))))
        embeds = self.model.embed(torch.tensor(ids, dtype=torch.int64, device=self.device),
                                  None, None)
        return self.model(self.ops, embeds, ctx, self.kv)

    def _context(self, is_prefill, seqs, positions, slots, cu_seqlens, prefix_lens, context_lens,
                 logits_rows) -> ForwardContext:
        i32 = dict(dtype=torch.int32, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        return ForwardContext(
            is_prefill=is_prefill,
            positions=torch.tensor(positions, **i64),
            slot_mapping=torch.tensor(slots, **i64),
            block_tables=torch.tensor(tables, **i32),
            cu_seqlens=torch.tensor(cu_seqlens, **i32),
            prefix_lens=torch.tensor(prefix_lens, **i32),
            context_lens=torch.tensor(context_lens, **i32),
            logits_rows=torch.tensor(logits_rows, **i64),
            has_prefix=any(prefix_lens),   # host ints: picks the prefill kernel variant, no sync
        )
