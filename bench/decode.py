"""Decode benchmark: one decode step of the fastllava runtime at the real LLaVA shapes (random
weights), batch 1 / 8 / 32 at a ~600-token context, next to transformers on the same GPU.

    python bench/decode.py [--model llava-1.5-13b] [--batches 1,8,32] [--context 600] [--out DIR]
    python bench/decode.py --smoke        # tiny config on the CPU (CI: tests/test_bench_decode.py)
    python bench/decode.py --quantization fp8   # + fastllava rows with FP8 linears (README "FP8")
    python bench/decode.py --kv-cache-dtype fp8   # + fastllava rows over fp8 KV pages, same run
    python bench/decode.py --model llava-v1.6-34b --tensor-parallel-size 2   # 2 GPUs (README)

Rows per batch size B (wall clock, torch.cuda.synchronize, median ms/step over --windows windows
of --steps steps, after --warmup steps):
- fastllava engine: Sequences of random prompt ids added to the engine's scheduler and driven
  without the engine thread, `schedule → runner.run → update`: what a user pays per token
  (scheduler, input packing, CUDA-graph replay, on-device sampling, the one host sync).
- fastllava overlapped loop: the same sequences driven by the engine thread's default loop
  (`Engine._overlapped_step`: launch step N+1, then read step N's ids and update), so the host
  work of a step runs while the GPU runs the one before it.
- fastllava graph replay: the same step's CUDA graph replayed bare: the GPU time alone. Below
  the table, per batch: each engine row's ms/step minus the replay's, the time a step adds
  around its graph (host work the loop does not hide, plus the step's small input and id
  copies): the GPU-idle gap per step, which the overlapped loop should bring to ~0.
- hf eager: transformers LlamaForCausalLM of the same text config (a LLaVA decode step after
  prefill is exactly the language model), random weights, sdpa, DynamicCache.
- hf compiled: the same with StaticCache + torch.compile(mode="reduce-overhead").
- with --quantization fp8 and/or --kv-cache-dtype fp8, the two fastllava rows again, in the
  same run after the model-dtype ones, for every other (weights, KV pages) combination asked:
  "(fp8)" FP8 decoder linears (their bytes counted at one byte per weight), "(fp8 KV)" an fp8 KV
  cache (one byte per element), "(fp8, fp8 KV)" both. One runtime at a time, each closed and
  its memory freed before the next (34B in bf16, then in fp8, on one GPU). Below the table, per
  such variant: its batch-1 engine tok/s / the model-dtype engine's (the FP8 target: >= 1.7x).
Work per step: the weights a decode step reads (decoder layers, final norm, lm_head, B rows of
the embedding table; not the vision tower) + the KV it attends over, 2*L*KVH*D*ctx*B*2 bytes at
the mean context of the timed steps; GB/s is reported against a 1 GiB copy measured in the run.
Beside this file: decode_plan.py (Plan, Row, the step timer), decode_peers.py (the transformers
rows), decode_report.py (GB/s, bars and the Markdown table).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys

import torch

from common import REPO, copy_ceiling, fail, require_compiled_gpu, run_header, variant_suffix
from common import variants, write_outputs
from decode_peers import hf_rows
from decode_plan import (ENGINE, HF_COMPILED, HF_EAGER, OVERLAP, REPLAY, Plan, Row, free_memory,
                         time_steps)
from decode_report import COLUMNS, cells, finish, gap_lines, ratio_lines, report

GIB = 1 << 30
PAGE = 16   # KV page size (RuntimeConfig's default)


def fitting_batches(t, plan: Plan) -> tuple[list[int], list[Row]]:
    """Batch sizes whose KV (+ 4 GiB for activations and graphs) fits next to the weights."""
    if plan.device != "cuda":
        return list(plan.batches), []
    free, _ = torch.cuda.mem_get_info()
    tokens = -(-plan.max_len // PAGE) * PAGE                     # whole pages
    per_seq = 2 * t.num_hidden_layers * t.kv_size * tokens * plan.dtype.itemsize
    fits = [B for B in plan.batches if B * per_seq + 4 * GIB <= free]
    skipped = [Row(impl, B, note=f"n/a: KV for B={B} needs {B * per_seq / GIB:.1f} GiB + 4 GiB "
                   f"reserve, {free / GIB:.1f} GiB free after the weights")
               for B in plan.batches if B not in fits for impl in (ENGINE, HF_EAGER, HF_COMPILED)]
    return fits, skipped


def fastllava_rows(config, plan: Plan) -> list[Row]:
    """Random weights → build_engine (the real runtime: paged KV, Triton ops and CUDA graphs on
    a GPU) → engine and graph-replay rows for every batch size whose KV fits. With
    --tensor-parallel-size N the decoder is split over N ranks (README "Tensor parallelism").
    Then the same again per other plan.variants entry (FP8 linears, fp8 KV pages): a fresh
    runtime each (same seed, so the same weights; under TP every rank sets up its pool anew),
    one at a time, the last one closed and its memory freed first. The batch sizes are the
    first (model-dtype, so largest) runtime's."""
    rows, batches = [], None
    for variant in plan.variants:
        batches, got = _runtime_rows(config, plan, variant, batches)
        rows += got
        free_memory(plan.device)
    return rows


def _runtime_rows(config, plan: Plan, variant: tuple[str | None, str],
                  batches: list[int] | None):
    """(batches, rows) for one (quantization, KV dtype); batches None: found here."""
    from fastllava.benchmarks.random_runtime import RandomRuntime
    from fastllava.runtime.config import RuntimeConfig

    quantization, kv = variant
    runtime = RandomRuntime(plan.random_config, plan.device, plan.dtype,
                            backend="torch" if plan.device == "cpu" else "auto",
                            quantization=quantization,
                            tensor_parallel_size=plan.tensor_parallel_size)
    try:
        rows = []
        if batches is None:
            batches, rows = fitting_batches(config.text, plan)   # beside the weights just loaded
        if not batches:
            return batches, rows
        pages = -(-plan.max_len // PAGE)
        engine, max_len = runtime.build(RuntimeConfig(
            page_size=PAGE, max_num_seqs=max(batches), kv_cache_tokens=max(batches) * pages * PAGE,
            max_context=plan.max_len, max_num_batched_tokens=max(4096, max(batches)),
            kv_cache_dtype=kv))
        if max_len < plan.max_len:
            raise ValueError(f"the engine caps requests at {max_len} tokens; --context "
                             f"{plan.context} needs {plan.max_len}")
        for B in batches:
            try:
                rows += engine_batch(engine, config.text, B, plan, variant)
            except Exception as exc:  # noqa: BLE001 - report the row, go on with the next batch
                rows.append(Row(ENGINE + variant_suffix(variant), B, variant=variant,
                                note=f"ERROR: {type(exc).__name__}: {exc}"[:200]))
        return batches, rows
    finally:
        runtime.close()   # drops the weights and the KV pool before the next variant's runtime


def engine_batch(engine, t, B: int, plan: Plan, variant=(None, "auto")) -> list[Row]:
    from fastllava.runtime.sequence import SamplingParams, Sequence

    label = variant_suffix(variant)

    sched, runner = engine.scheduler, engine.runner
    rng = random.Random(B)
    params = SamplingParams(max_tokens=plan.max_len, temperature=0.0, stop_ids=())
    seqs = [Sequence([rng.randrange(t.vocab_size) for _ in range(plan.context)], params,
                     plan.max_len) for _ in range(B)]

    def step(decode: bool) -> None:
        batch = sched.schedule()
        if decode and (batch is None or not batch.is_decode or len(batch.seqs) != B):
            raise RuntimeError(f"expected a decode step of all {B} sequences, got {batch}")
        if sched.update(batch, runner.run(batch)):
            raise RuntimeError("a sequence finished during the benchmark (max_len too small)")

    for seq in seqs:
        sched.add(seq)
    try:
        while any(seq.num_generated == 0 for seq in seqs):   # (chunked) prefill of all prompts
            step(False)
        for _ in range(plan.warmup):
            step(True)
        ctx = len(seqs[0]) + (plan.timed - 1) / 2
        rows = [Row(ENGINE + label, B, ctx, time_steps(lambda: step(True), plan),
                    variant=variant)]
        rows.append(overlapped_row(engine, seqs, B, plan, variant))
        graphs = runner.graphs
        if graphs is None or not graphs.graphs:
            tp = f", tensor parallelism {plan.tensor_parallel_size}" \
                if plan.tensor_parallel_size > 1 else ""
            rows.append(Row(REPLAY + label, B, variant=variant, note=f"n/a: no CUDA graphs "
                            f"(ops {runner.ops.name} on {plan.device}{tp})"))
            return rows
        bs = next(b for b in graphs.buckets if b >= B)   # replays the last step's inputs
        # Under tensor parallelism every rank replays: rank 0 names the bucket to the workers.
        replay = functools.partial(graphs.replay, bs) if plan.tensor_parallel_size > 1 \
            else graphs.graphs[bs].replay
        rows.append(Row(REPLAY + label, B, len(seqs[0]) - 1, time_steps(replay, plan),
                        variant=variant, note="" if bs == B else f"bucket {bs}"))
        if not torch.isfinite(graphs.outputs[bs][0][:B]).all():     # (logits, greedy ids)
            rows[-1].note = "ERROR: non-finite logits from the random weights"
        return rows
    finally:
        for seq in seqs:
            sched.abort(seq)
            runner.release(seq)
        if sched.bm.num_used_pages:
            raise RuntimeError(f"{sched.bm.num_used_pages} KV pages still used after abort")


def overlapped_row(engine, seqs, B: int, plan: Plan, variant) -> Row:
    """The OVERLAP row: warm-up and timed steps of the engine's overlapped loop, run here on the
    calling thread (the engine thread is not started), then the step in flight finished. The
    loop reports a failed step to the requests it holds (none here), so the row checks the
    sequences' progress instead: every one must be exactly one token further per step."""
    label = OVERLAP + variant_suffix(variant)
    before = [seq.num_generated for seq in seqs]
    try:
        for _ in range(plan.warmup):
            engine._overlapped_step()
        ctx = len(seqs[0]) + (plan.timed - 1) / 2
        ms = time_steps(engine._overlapped_step, plan)
        engine._drain()
    except Exception as exc:  # noqa: BLE001 - report the row, go on with the others
        engine._in_flight = None
        return Row(label, B, variant=variant, note=f"ERROR: {type(exc).__name__}: {exc}"[:200])
    steps = plan.warmup + plan.timed
    if [seq.num_generated for seq in seqs] != [n + steps for n in before]:
        return Row(label, B, variant=variant, note=f"ERROR: the sequences did not all advance "
                   f"{steps} tokens (a step failed: see the engine's log)")
    return Row(label, B, ctx, ms, variant=variant)


def main(argv: list[str]) -> int:
    from fastllava.weights.random import REAL_CONFIGS, TINY_CONFIG, llava_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava-1.5-13b", choices=sorted(REAL_CONFIGS))
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="decode steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peers", default="eager,compiled", help="transformers peers, or 'none'")
    p.add_argument("--out", help="folder for the .md and .csv (GPU default: bench/results/)")
    p.add_argument("--quantization", choices=("fp8",), help="fp8: also time fastllava with its "
                   "decoder linears in FP8, after the model-dtype rows (peers: model dtype)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="fp8: also time fastllava over fp8 KV pages, beside the model-dtype rows")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split fastllava's decoder over N GPUs (ranks; CPU processes with "
                   "--smoke); the transformers peers stay on one")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, 2-3 steps")
    args = p.parse_args(argv[1:])
    peers = tuple(x for x in args.peers.split(",") if x and x != "none")
    if set(peers) - {"eager", "compiled"}:
        fail(f"--peers takes eager, compiled or none, got {args.peers!r}")
    asked = variants(args.quantization, args.kv_cache_dtype)
    if args.smoke:
        plan = Plan("cpu", torch.float32, (1, 3), 20, 1, 3, 2, peers,
                    args.tensor_parallel_size, "tiny", asked)
        config, name = llava_config(TINY_CONFIG), "tiny (smoke)"
    else:
        require_compiled_gpu("decode.py", "tiny config")
        batches = tuple(int(b) for b in args.batches.split(","))
        if min(batches) < 1 or min(args.context, args.steps, args.windows) < 1:
            fail("--batches, --context, --steps and --windows must be >= 1")
        plan = Plan("cuda", torch.bfloat16, batches, args.context, args.warmup, args.steps,
                    args.windows, peers, args.tensor_parallel_size, args.model, asked)
        config, name = llava_config(REAL_CONFIGS[args.model]), args.model
    if plan.max_len > config.text.max_position_embeddings:
        fail(f"--context {plan.context} + {plan.max_len - plan.context} decode tokens exceeds "
             f"{name}'s max_position_embeddings {config.text.max_position_embeddings}")
    out = args.out or (os.path.join(REPO, "bench", "results") if not args.smoke else None)
    header = run_header(argv, plan.device)
    if args.smoke:   # the smoke run uses the torch ops, not the interpreted kernels
        header["gpu"] = "cpu (--smoke, torch ops)"
    header.update(model=f"{name}, random weights (seed 0)", dtype=str(plan.dtype)[6:],
                  quantization=" and ".join(dict.fromkeys(q or "none" for q, _ in plan.variants))
                  + " (fastllava rows)",
                  tensor_parallel_size=f"{plan.tensor_parallel_size} (fastllava rows)",
                  kv_cache_dtype=" and ".join(dict.fromkeys(kv for _, kv in plan.variants))
                  + " (fastllava rows)")
    ceilings = [copy_ceiling()] if plan.device == "cuda" else []
    rows = fastllava_rows(config, plan)
    free_memory(plan.device)
    measured = sorted({r.B for r in rows if r.impl == ENGINE and not r.note.startswith("n/a")})
    rows += hf_rows(config.text, plan, measured)
    rows = finish(rows, config.text, plan, ceilings[0].value if ceilings else None)
    text = report(header, ceilings, rows, name, plan.context,
                  ratio_lines(rows, plan) + gap_lines(rows))
    print(text)
    if out:
        print("wrote", ", ".join(write_outputs(out, "decode", header, text, COLUMNS,
                                                   [cells(r, name, plan.context) for r in rows])))
    errors = [r for r in rows if r.note.startswith("ERROR")]
    if errors:
        print(f"{len(errors)} row(s) failed: see the ERROR notes above", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
