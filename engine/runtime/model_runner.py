"""The model runner: scheduled sequences → packed tensors → one forward → sampled tokens.

Each step rebuilds the flat inputs from the sequences (the source of truth):
- prefill / mixed steps: the chunks of all sequences packed along N (decodes ride along as 1-token
  chunks with their whole context as cached prefix), varlen attention over cu_seqlens with the
  cached prefix read through the block tables;
- decode steps: one token per sequence, paged decode attention, replayed from a CUDA graph when
  the runner has them (`DecodeGraphs`); either way the inputs come from `DecodeInputs` (carried
  over on the device in a steady decode; built in place in the graphs' static buffers).
Image features for chunks that touch an image come from the feature LRU or from one vision-tower
run over all new images of the step (all tiles of all requests in one batch). Sampling happens on
the device (inside the decode graphs when a decode step replays them); the only host sync per step
is reading the B sampled ids back.

`launch` queues a step and returns at once (`StepOutput`); the overlapped engine loop packs the
next step meanwhile. Token ids may be placeholders for ids a step still in flight samples
(`FutureTokens`): they are swapped for the real ids on the device. Block tables live on the device
(`DeviceBlockTables`) and small inputs go through pinned memory (`step_io.to_device`).
"""

from __future__ import annotations

import torch

from fastllava.kv_cache import KVCache
from fastllava.models.context import ForwardContext
from fastllava.preprocess.processor import ProcessedImage
from fastllava.runtime.cuda_graphs import DecodeGraphs
from fastllava.runtime.decode_inputs import DecodeInputs
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.memory_plan import MemoryPlan
from fastllava.runtime.sampler import SamplingBatches, raw_logprobs, sample
from fastllava.runtime.scheduler import Batch
from fastllava.runtime.sequence import Sequence
from fastllava.runtime.step_io import (DeviceBlockTables, FutureTokens, StepOutput,
                                       parts_to_device, to_device)


def leading_decode_rows(cu_seqlens: list[int], prefix_lens: list[int]) -> int:
    """How many sequences at the front of a prefill step are 1-token chunks over a cached prefix
    (decodes riding it: the scheduler puts running decodes first): `ForwardContext.decode_rows`."""
    d = 0
    while d < len(prefix_lens) and cu_seqlens[d + 1] - cu_seqlens[d] == 1 and prefix_lens[d] > 0:
        d += 1
    return d


class ModelRunner:
    def __init__(self, model, ops, kv: KVCache, image_cache: ImageFeatureCache,
                 graphs: DecodeGraphs | None = None, memory_plan: MemoryPlan | None = None,
                 max_num_seqs: int = 256):
        """max_num_seqs: the most rows a step may have (sizes the ring of future token ids)."""
        self.model, self.ops, self.kv = model, ops, kv
        self.memory_plan = memory_plan     # how the KV pool was sized (stats())
        self.device = kv.k[0].device
        self.image_cache = image_cache
        self.graphs = graphs
        self._features: dict[int, list[torch.Tensor | None]] = {}   # seq_id → per-image features
        self.block_tables = DeviceBlockTables(self.device)
        self._future = FutureTokens(max_num_seqs, self.device)
        self._decode_inputs = DecodeInputs(self.device, kv.page_size, self._future)
        self._sampling = SamplingBatches(self.device)

    def run(self, batch: Batch) -> list[int | None]:
        """One step; the sampled token of each seq that reached its last token, else None."""
        return self.launch(batch).tokens()

    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepOutput:
        """Queue one step on the device and return without waiting for its sampled ids."""
        samples = batch.samples
        graphed = batch.is_decode and self._graphed(batch.seqs)
        if batch.is_decode:
            logits = self._decode(batch.seqs)
        else:
            logits = self._prefill(batch, samples)
        picked = batch.seqs if all(samples) else [q for q, s in zip(batch.seqs, samples) if s]
        if not picked:
            return StepOutput(samples, [], None)
        # The step index of a seq whose last token is a placeholder counts that token: the index
        # the serial loop uses once the token is known (seeded noise depends on it).
        params = self._sampling.get(picked)
        # A graphed decode samples inside the graphs (the same ids as sample(logits, params)).
        ids = self.graphs.sample(params) if graphed else sample(logits, params)
        if self._sampling.any_logprobs:                  # only when a request of the batch asks
            self._record_logprobs(picked, logits, ids)   # reads them back: a sync, for them only
        return StepOutput(samples, self._future.put(ids), ids)

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
        """Drop what the runner holds for seq (its image features, its device block table)."""
        self._drop_features(seq)
        self.block_tables.release(seq)

    def _drop_features(self, seq: Sequence) -> None:
        self._features.pop(seq.seq_id, None)

    # ---- prefill and mixed steps --------------------------------------------------------------
    def _prefill(self, batch: Batch, samples: list[bool]) -> torch.Tensor:
        S = self.kv.page_size
        ids, positions, slots, is_image, feats = [], [], [], [], []
        cu_seqlens, logits_rows = [0], []
        for seq, start, n, s in zip(batch.seqs, batch.starts, batch.num_tokens, samples):
            end = start + n
            bt = seq.block_table
            chunk = seq.token_ids[start:end]
            positions += range(start, end)
            slots += [bt[t // S] * S + t % S for t in range(start, end)]
            flags = [False] * n
            for j, img in enumerate(seq.images):
                lo, hi = max(start, img.start), min(end, img.end)
                if lo < hi:
                    flags[lo - start:hi - start] = [True] * (hi - lo)
                    # Image positions take features, not embeddings: id 0 there, so an original
                    # checkpoint's negative sentinel is never read as a future-token placeholder.
                    chunk[lo - start:hi - start] = [0] * (hi - lo)
                    feats.append(self._image_features(seq, j, batch)[lo - img.start:hi - img.start])
            ids += chunk
            is_image += flags
            cu_seqlens.append(cu_seqlens[-1] + n)
            if s:
                logits_rows.append(cu_seqlens[-1] - 1)
        # Scored prompt positions (LLaVA.score) add rows after the sampling rows; none otherwise.
        scored = self._scored_rows(batch, cu_seqlens)
        logits_rows += [row for row, _, _ in scored]
        ids_t, ctx = self._context(batch.seqs, ids, positions, slots, cu_seqlens, batch.starts,
                                   [s + n for s, n in zip(batch.starts, batch.num_tokens)],
                                   logits_rows)
        mask = None
        if feats:
            flagged, rows = sum(is_image), sum(f.shape[0] for f in feats)
            if flagged != rows:      # by construction equal; `embed` relies on it (no device check)
                raise RuntimeError(f"step has {flagged} image positions but {rows} feature rows")
            mask = to_device(is_image, torch.bool, self.device)
        embeds = self.model.embed(ids_t, mask, torch.cat(feats) if feats else None)
        logits = self.model(self.ops, embeds, ctx, self.kv)
        if scored:
            logits = self._record_prompt_logprobs(scored, logits)
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens):
            if all(start + n >= img.end for img in seq.images):
                self._drop_features(seq)     # past its images: their features are no longer needed
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
        if self._graphed(seqs):
            return self.graphs.run_batch(seqs, self._decode_inputs, self.block_tables.gather(seqs))
        ids_t, ctx = self._decode_inputs.build(seqs, self.block_tables.gather(seqs))
        embeds = self.model.embed(ids_t, None, None)
        return self.model(self.ops, embeds, ctx, self.kv)

    def _graphed(self, seqs: list[Sequence]) -> bool:
        """A decode step of these seqs replays from the CUDA graphs (forward and sampler)."""
        return self.graphs is not None and len(seqs) <= self.graphs.max_batch_size

    def _context(self, seqs, ids, positions, slots, cu_seqlens, prefix_lens, context_lens,
                 logits_rows) -> tuple[torch.Tensor, ForwardContext]:
        """A prefill or mixed step's (token ids (N,) int64 on the device, placeholders resolved;
        context). The int64 and the int32 inputs each travel as one flat tensor (two host→device
        copies per step instead of eight): per-tensor overhead is most of a small step's packing
        cost."""
        ids_t, positions_t, slots_t, rows_t = parts_to_device(
            [ids, positions, slots, logits_rows], torch.int64, self.device)
        cu_t, prefix_t, context_t = parts_to_device(
            [list(cu_seqlens), list(prefix_lens), list(context_lens)], torch.int32, self.device)
        ctx = ForwardContext(
            is_prefill=True, positions=positions_t, slot_mapping=slots_t,
            block_tables=self.block_tables.gather(seqs), cu_seqlens=cu_t, prefix_lens=prefix_t,
            context_lens=context_t, logits_rows=rows_t,
            has_prefix=any(prefix_lens),   # host ints: pick the kernel variants, no sync
            decode_rows=leading_decode_rows(cu_seqlens, prefix_lens))
        return self._future.resolve(ids_t, ids), ctx
