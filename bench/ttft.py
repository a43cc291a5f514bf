"""Idle TTFT of one image request through the fastllava runtime at the real LLaVA shapes (random
weights), from the JPEG bytes to the first sampled token.

    python bench/ttft.py [--models llava-1.5-13b,llava-v1.6-34b] [--image 1024x768] [--out DIR]
    python bench/ttft.py --smoke      # tiny config on the CPU (CI: tests/test_gpu_suite_smoke.py)
    python bench/ttft.py --kv-cache-dtype fp8   # + a row per model over fp8 KV pages, same run
    python bench/ttft.py --quantization fp8     # + a row per model with FP8 decoder linears
    python bench/ttft.py --models llava-v1.6-34b --tensor-parallel-size 2   # 2 GPUs (README)

Per model: random weights (fastllava.weights.random) → `build_engine` (memory plan, CUDA graphs,
warm-up of every kernel variant; with --tensor-parallel-size N the decoder split over N ranks,
the tower on rank 0), then --repeats requests one at a time, each timed with
`time.perf_counter()` around: JPEG decode (PIL) → `preprocess` on the device (anyres tiles) →
a `Sequence` of --prompt-tokens random ids around the image placeholders → `schedule → run →
update` until the first token is sampled (tower + projector + prefill + sampler), synchronised.
What is left out: tokenizing the prompt and the API/server layers (request parsing, streaming).
Each request gets fresh random prompt ids and its own image key, so neither the prefix cache nor
the image-feature cache can hit: the idle, cold-cache TTFT. Reported: p50, p99 and min over the
repeats, the p50 split into preprocess and engine ms, and the performance.md bars (13B p50
≤ 35 ms; 34B ≤ 340 ms, set at a 672 px image; p99 ≤ 1.2 x p50).
With --quantization fp8 and/or --kv-cache-dtype fp8, each model's model-dtype row comes first,
then one row per other (weights, KV pages) combination asked (columns `quantization`,
`kv_cache`), in the same run: a fresh runtime each (same seed, so the same random weights),
the previous one closed and its memory freed first; below the table, per such row, its p50 /
the model-dtype row's p50.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from common import fail, fmt, require_compiled_gpu, run_header, variant_suffix, variants
from common import write_outputs

BARS_MS = {"llava-1.5-13b": 35.0, "llava-v1.6-34b": 340.0}   # performance.md, TTFT p50, H100
P99_BAR = 1.2
COLUMNS = ("model", "tp", "quantization", "kv_cache", "image", "image_tokens", "prompt_tokens",
           "p50_ms", "p99_ms", "min_ms", "preprocess_ms", "engine_ms", "bar", "note")


def jpeg(w: int, h: int, seed: int) -> bytes:
    """A smooth random JPEG (noise would compress badly and decode unusually slowly)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def processor_config(config):
    from fastllava.preprocess.processor import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
    tile = config.vision.image_size
    pinpoints = tuple(tuple(p) for p in config.pinpoints) if config.kind == "next" else None
    return ImageProcessorConfig(tile, tile, tile, CLIP_MEAN, CLIP_STD, pinpoints=pinpoints)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def model_row(name: str, args, device: str, dtype: torch.dtype, variant) -> list:
    """The row of one (quantization, KV page dtype): a fresh runtime (seed 0, so the same random
    weights for every variant; under TP every rank sets up its own pool), closed on return."""
    from fastllava.benchmarks.random_runtime import RandomRuntime
    from fastllava.runtime.config import RuntimeConfig

    quantization, kv = variant
    runtime = RandomRuntime(name, device, dtype, backend="torch" if device == "cpu" else "auto",
                            quantization=quantization,
                            tensor_parallel_size=args.tensor_parallel_size)
    try:
        rc = RuntimeConfig(max_num_seqs=4, kv_cache_tokens=8192, max_context=4096,
                           max_num_batched_tokens=4096, kv_cache_dtype=kv)
        engine, max_len = runtime.build(rc)
        return timed_row(name, runtime.config, engine, max_len, args, device, variant)
    finally:
        runtime.close()   # drops the weights and the KV pool before the next variant's runtime


def timed_row(name: str, config, engine, max_len: int, args, device: str, variant) -> list:
    from fastllava.preprocess.anyres import anyres_num_tokens
    from fastllava.preprocess.processor import preprocess
    from fastllava.runtime.sequence import ImageSpan, SamplingParams, Sequence

    sched, runner = engine.scheduler, engine.runner
    pcfg = processor_config(config)
    w, h = args.image
    data = jpeg(w, h, seed=0)
    rng = random.Random(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    image_id, t = config.image_token_id, config.text
    times, pre_times, n_image = [], [], 0
    for i in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        img = preprocess(Image.open(io.BytesIO(data)), pcfg, device=device)
        t1 = time.perf_counter()
        if config.kind == "next":
            n_image = anyres_num_tokens(img.image_size, config.pinpoints, config.vision.image_size,
                                        config.vision.patch_size, config.tokens_per_tile)
        else:
            n_image = config.tokens_per_tile
        before = [rng.randrange(3, min(t.vocab_size, image_id)) for _ in range(args.prompt_tokens // 2)]
        after = [rng.randrange(3, min(t.vocab_size, image_id)) for _ in range(args.prompt_tokens - len(before))]
        ids = before + [image_id] * n_image + after
        span = ImageSpan(len(before), n_image, img.key + i.to_bytes(4, "little"))  # no cache hit
        seq = Sequence(ids, SamplingParams(max_tokens=2, temperature=0.0), max_len, (span,),
                       payload=(img,))
        sched.add(seq)
        try:
            while seq.num_generated == 0:
                batch = sched.schedule()
                sched.update(batch, runner.run(batch))
            sync()
            t2 = time.perf_counter()
        finally:
            sched.abort(seq)
            runner.release(seq)
        if i >= args.warmup:
            times.append((t2 - t0) * 1e3)
            pre_times.append((t1 - t0) * 1e3)
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    bar = BARS_MS.get(name)
    bar_text = f"p50 ≤ {bar:g} ms, p99 ≤ {P99_BAR} x p50" if bar else ""
    note = ""
    if bar and device == "cuda":
        ok = p50 <= bar and p99 <= P99_BAR * p50
        note = "meets the bar" if ok else "BELOW the bar"
    pre = statistics.median(pre_times)
    return [name, args.tensor_parallel_size, variant[0] or "none", variant[1], f"{w}x{h}",
            n_image, args.prompt_tokens, p50,
            p99, min(times), pre, p50 - pre,
            bar_text, note]


def markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(c) if c != "" else "-" for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio_lines(rows: list[list]) -> list[str]:
    """Per model and non-model-dtype row: its TTFT p50 / the model-dtype row's (< 1: faster)."""
    p50 = {(r[0], r[2], r[3]): r[COLUMNS.index("p50_ms")] for r in rows}
    lines = []
    for model, q, kv in p50:
        if (q, kv) == ("none", "auto"):
            continue
        base, mine = p50.get((model, "none", "auto")), p50[(model, q, kv)]
        name = variant_suffix((None if q == "none" else q, kv)).strip(" ()")
        ratio = f"{mine / base:.2f}x" if base and mine else "n/a (not measured)"
        lines.append(f"- {model}, {name} / model dtype TTFT p50: {ratio}")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llava-1.5-13b,llava-v1.6-34b",
                   help="comma-separated keys of fastllava.weights.random.REAL_CONFIGS")
    p.add_argument("--image", default="1024x768", help="WxH of the JPEG")
    p.add_argument("--prompt-tokens", type=int, default=40, help="text tokens around the image")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="folder for the .md and .csv (GPU default: bench/results/)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="fp8: also time each model over fp8 KV pages, beside the model dtype")
    p.add_argument("--quantization", choices=("fp8",),
                   help="fp8: also time each model with its decoder linears in FP8")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the decoder over N GPUs (ranks; CPU processes with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, 2 requests")
    args = p.parse_args(argv)
    try:
        w, h = (int(x) for x in args.image.lower().split("x"))
    except ValueError:
        fail(f"--image must be WxH, got {args.image!r}")
    args.image = (w, h)
    if args.tensor_parallel_size < 1:
        fail(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    from fastllava.weights.random import REAL_CONFIGS
    if args.smoke:
        device, dtype = "cpu", torch.float32
        models = ["tiny"]
        args.repeats, args.warmup, args.prompt_tokens = 2, 1, 8
    else:
        require_compiled_gpu("ttft.py", "tiny model, CPU times mean nothing")
        device, dtype = "cuda", torch.bfloat16
        names = [m for m in args.models.split(",") if m]
        unknown = [m for m in names if m not in REAL_CONFIGS]
        if unknown:
            fail(f"unknown --models {unknown}; known: {sorted(REAL_CONFIGS)}")
        models = names
    header = run_header(["bench/ttft.py", *argv], device)
    rows, failed = [], False
    for name in models:
        for variant in variants(args.quantization, args.kv_cache_dtype):
            try:
                rows.append(model_row(name, args, device, dtype, variant))
            except Exception as exc:  # noqa: BLE001 - report the row, go on with the next one
                failed = True
                rows.append([name, args.tensor_parallel_size, variant[0] or "none", variant[1],
                             "x".join(map(str, args.image)), "", "", None, None, None, None,
                             None, "",
                             f"ERROR: {type(exc).__name__}: {exc}"[:300]])
            finally:
                import gc
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    ratios = "".join(f"\n{line}" for line in ratio_lines(rows))
    text = f"# TTFT, idle, one image\n\n{meta}\n\n{markdown(rows)}\n" + (ratios and ratios + "\n")
    print(text)
    out = args.out or (None if args.smoke else os.path.join(os.path.dirname(__file__), "results"))
    if out:
        for path in write_outputs(out, "ttft", header, text, COLUMNS, rows):
            print("wrote", path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
