"""CPU path against its peer, same run, same workload: fastllava's torch backend (fused SDPA), its
plain references (the old CPU path) and transformers batched.

    python bench/cpu_path.py [--model PATH | --width 512 --layers 4] [--requests 64]
                             [--max-tokens 64] [--peer-batch 16] [--idle 8]
                             [--kv-cache-tokens 65536] [--threads T] [--dtype-auto]
                             [--interleaved-ttft N] [--out DIR] [--smoke]

Workload: N greedy requests, each a random-RGB PNG (24..480 px a side) and a 3..30-word prompt,
max_tokens M. Per engine:
- idle TTFT: the first `--idle` requests one at a time on an idle engine (image load,
  preprocessing, prefill, first token), median;
- throughput: all N submitted at once (fastllava: N threads through the public API, continuous
  batching; transformers: `generate` on batches of `--peer-batch` requests in order, left-padded,
  sdpa attention, fp32), requests/s and output tokens/s over the wall time, the process's CPU
  seconds over that phase, output tokens per CPU second, and the 1-minute load average after it.
transformers' idle TTFT is `generate(max_new_tokens=1)` after the same image load and its own
processor. fastllava's outputs must be identical on both backends (greedy, fp32): a MISMATCH line
and exit 1 otherwise. Without --model a tiny random LLaVA-1.5 with a 512-wide, 4-layer Llama is
built with tests/tiny.py (`--width` / `--layers` scale its Llama; 64-wide heads). `--dtype-auto`
adds a torch-backend row with dtype="auto" (bf16 on CPUs with AMX / AVX512-BF16, else fp32): its
outputs are counted against the fp32 ones, not required to match. `--interleaved-ttft N` times
idle TTFT once more with fastllava and transformers both loaded, alternating over N requests (the
phases above run one engine after the other, while a shared machine's load drifts). Needs
transformers (the test extra).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, fmt, run_header, write_outputs
from serving import WORDS, device_name, run_one, run_threads, short_commit, write_image

TINY = dict(kind="llava", num_heads=8, num_kv_heads=8, hidden_size=512, intermediate_size=1376,
            num_layers=4, image_size=336, seed=5)


def model_spec(width: int, layers: int) -> dict:
    """TINY with its Llama scaled: `width` wide (64-wide heads, MLP ≈ 2.7x), `layers` deep."""
    return dict(TINY, hidden_size=width, num_layers=layers, num_heads=width // 64,
                num_kv_heads=width // 64, intermediate_size=(width * 43 // 16 + 31) // 32 * 32)


def tiny_name(width: int, layers: int) -> str:
    return ("tiny random LLaVA-1.5 at real geometry (336 px tile, 576 image tokens; CLIP 32 wide "
            f"x 3 layers), Llama {width} wide x {layers} layers, {width // 64} heads "
            "(tests/tiny.py)")
COLUMNS = ("engine", "requests", "idle_ttft_p50_ms", "wall_s", "req_per_s", "out_tok_per_s",
           "cpu_s", "out_tok_per_cpu_s", "load_avg")
HEADS = ("engine", "requests", "idle TTFT p50 ms", "wall s", "req/s", "out tok/s", "CPU s",
         "out tok / CPU s", "load avg")


def throughput_row(engine: str, n: int, ttft: list[float], wall: float, cpu: float,
                   tokens: int) -> dict:
    """cpu = process CPU seconds over the throughput phase: on a shared machine, where wall
    time depends on what else runs, tokens per CPU second compare the engines' work."""
    return {"engine": engine, "requests": n, "idle_ttft_p50_ms": 1e3 * statistics.median(ttft),
            "wall_s": wall, "req_per_s": n / wall, "out_tok_per_s": tokens / wall, "cpu_s": cpu,
            "out_tok_per_cpu_s": tokens / cpu, "load_avg": os.getloadavg()[0]}


def build_workload(seed: int, n: int, max_tokens: int, img_dir: Path) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        write_image(rng, img_dir / f"img{i}.png", 24, 480)
        reqs.append({"image_url": str(img_dir / f"img{i}.png"), "max_tokens": max_tokens,
                     "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))),
                     "temperature": 0.0})
    return reqs


def run_fastllava(path, backend: str, workload: list[dict], idle: int,
                  kv_cache_tokens: int, dtype: str = "float32") -> tuple[dict, list]:
    from fastllava import LLaVA
    from fastllava.runtime.config import RuntimeConfig
    llava = LLaVA.from_pretrained(path, "cpu", dtype, backend=backend,
                                  runtime=RuntimeConfig(kv_cache_tokens=kv_cache_tokens))
    name = f"fastllava backend={backend}" + (
        "" if dtype == "float32" else f" dtype={dtype} ({str(llava.dtype).removeprefix('torch.')})")
    try:
        warm = dict(workload[0], max_tokens=4)
        run_one(llava, warm)
        run_threads(llava, [warm] * 4, [0.0] * 4)      # batched shapes, not timed
        llava.reset_prefix_cache()
        ttft = [first_token_s(llava, req) for req in workload[:idle]]
        llava.reset_prefix_cache()
        t0, c0 = time.perf_counter(), time.process_time()
        traces = run_threads(llava, workload, [0.0] * len(workload))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        llava.close()
    errors = [t.error for t in traces if t.error]
    if errors:
        raise RuntimeError(f"{backend}: {len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(t.final["completion_tokens"] for t in traces)
    row = throughput_row(name, len(workload), ttft, wall, cpu, tokens)
    return row, [t.final["output"] for t in traces]


def transformers_generate(path):
    """transformers as a user would batch it (chat template, its processor, generate(), fp32,
    sdpa): generate(requests, max_new_tokens) -> new tokens."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"

    def generate(reqs: list[dict], max_new_tokens: int) -> int:
        chats = [[{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": r["prompt"]}]}]
                 for r in reqs]
        texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        images = [Image.open(r["image_url"]).convert("RGB") for r in reqs]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return int((new != processor.tokenizer.pad_token_id).sum())
    return generate


def first_token_s(llava, req: dict) -> float:
    trace = run_one(llava, req)
    return next(ts for ts, c in trace.events if c >= 1) - trace.submit


def interleaved_ttft(path, workload: list[dict], n: int, kv_cache_tokens: int
                     ) -> tuple[float, float]:
    """Idle TTFT medians (s) of fastllava (torch backend, fp32) and transformers with both loaded,
    alternating request by request: on a shared machine whose load drifts between the phases
    above, this pairs every measurement with the other engine's at the same moment."""
    from fastllava import LLaVA
    from fastllava.runtime.config import RuntimeConfig
    generate = transformers_generate(path)
    llava = LLaVA.from_pretrained(path, "cpu", "float32", backend="torch",
                                  runtime=RuntimeConfig(kv_cache_tokens=kv_cache_tokens))
    try:
        first_token_s(llava, dict(workload[0], max_tokens=2))
        generate(workload[:1], 2)                                    # warm-ups, not timed
        ours, theirs = [], []
        for req in workload[:n]:
            llava.reset_prefix_cache()
            ours.append(first_token_s(llava, dict(req, max_tokens=1)))
            t0 = time.perf_counter()
            generate([req], 1)
            theirs.append(time.perf_counter() - t0)
    finally:
        llava.close()
    return statistics.median(ours), statistics.median(theirs)


def run_transformers(path, workload: list[dict], batch: int, idle: int) -> dict:
    generate = transformers_generate(path)
    generate(workload[:batch], 4)                                   # warm-up, not timed
    ttft = []
    for req in workload[:idle]:
        t0 = time.perf_counter()
        generate([req], 1)
        ttft.append(time.perf_counter() - t0)
    t0, c0, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(workload), batch):
        chunk = workload[i:i + batch]
        tokens += generate(chunk, max(r["max_tokens"] for r in chunk))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return throughput_row(f"transformers batched by {batch} (sdpa)", len(workload), ttft, wall,
                          cpu, tokens)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random LLaVA-1.5)")
    parser.add_argument("--width", type=int, default=TINY["hidden_size"],
                        help="the tiny model's Llama width (heads of 64)")
    parser.add_argument("--layers", type=int, default=TINY["num_layers"],
                        help="the tiny model's Llama layers")
    parser.add_argument("--dtype-auto", action="store_true",
                        help='also time the torch backend with dtype="auto" (bf16 on AMX / '
                             "AVX512-BF16 CPUs)")
    parser.add_argument("--interleaved-ttft", type=int, default=0, metavar="N",
                        help="also time idle TTFT of fastllava (torch, fp32) and transformers "
                             "alternately over N requests, both loaded")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--peer-batch", type=int, default=16)
    parser.add_argument("--idle", type=int, default=8, help="requests timed alone for idle TTFT")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--kv-cache-tokens", type=int, default=65536,
                        help="fastllava's KV pool (the CPU default, max_context = 8192, holds "
                             "about 12 such requests; transformers holds a whole batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for cpu_path-<device>-<date>.md and .csv")
    parser.add_argument("--smoke", action="store_true", help="6 requests x 4 tokens (CI plumbing)")
    args = parser.parse_args(argv[1:])
    if args.smoke:
        args.requests, args.max_tokens, args.peer_batch, args.idle = 6, 4, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fastllava-cpu-path-") as tmp:
        tmp = Path(tmp)
        path = args.model
        if not path:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            import tiny
            path = tiny.build(tiny.Spec(**model_spec(args.width, args.layers)), tmp / "tiny")
        (tmp / "img").mkdir()
        workload = build_workload(args.seed, args.requests, args.max_tokens, tmp / "img")
        rows, outputs = [], {}
        for backend in ("torch", "reference"):
            row, outputs[backend] = run_fastllava(path, backend, workload, args.idle,
                                                  args.kv_cache_tokens)
            rows.append(row)
        rows.append(run_transformers(path, workload, args.peer_batch, args.idle))
        if args.dtype_auto:
            row, outputs["auto"] = run_fastllava(path, "torch", workload, args.idle,
                                                 args.kv_cache_tokens, "auto")
            rows.append(row)
        paired = args.interleaved_ttft and interleaved_ttft(
            path, workload, args.interleaved_ttft, args.kv_cache_tokens)
    bad = [f"MISMATCH request {i}: torch {a!r} vs reference {b!r}"
           for i, (a, b) in enumerate(zip(outputs["torch"], outputs["reference"])) if a != b]
    header = run_header(argv, "cpu")
    del header["gpu"], header["commit"]
    header = {"device": device_name(torch.device("cpu")), "commit": short_commit(), **header,
              "threads": str(torch.get_num_threads()),
              "model": args.model or tiny_name(args.width, args.layers),
              "dtype": "float32" + (" (the dtype=auto row: as its name says)" if args.dtype_auto else ""),
              "kv_cache_tokens": str(args.kv_cache_tokens)}
    table = ["| " + " | ".join(HEADS) + " |", "|" + "---|" * len(HEADS)]
    table += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    new, old, peer = rows[:3]
    ratios = (f"torch backend vs transformers: throughput "
              f"{new['req_per_s'] / peer['req_per_s']:.2f}x (per CPU second "
              f"{new['out_tok_per_cpu_s'] / peer['out_tok_per_cpu_s']:.2f}x), idle TTFT "
              f"{new['idle_ttft_p50_ms'] / peer['idle_ttft_p50_ms']:.2f}x (< 1 is faster); vs "
              f"the references: throughput {new['req_per_s'] / old['req_per_s']:.2f}x, idle TTFT "
              f"{new['idle_ttft_p50_ms'] / old['idle_ttft_p50_ms']:.2f}x")
    notes = bad or [f"torch and reference backends: all {len(workload)} outputs identical"]
    if paired:
        notes.append(f"idle TTFT interleaved over {args.interleaved_ttft} requests, both loaded: "
                     f"fastllava torch {1e3 * paired[0]:.0f} ms, transformers "
                     f"{1e3 * paired[1]:.0f} ms ({paired[0] / paired[1]:.2f}x)")
    if args.dtype_auto:
        auto = rows[3]
        same = sum(a == b for a, b in zip(outputs["auto"], outputs["torch"]))
        notes.append(f"dtype=auto vs float32 (torch backend): idle TTFT "
                     f"{auto['idle_ttft_p50_ms'] / new['idle_ttft_p50_ms']:.2f}x, throughput "
                     f"{auto['req_per_s'] / new['req_per_s']:.2f}x; {same} of {len(workload)} "
                     f"outputs identical to float32's (not required: another dtype)")
    text = ("# CPU path benchmark\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in header.items())
            + f"\n- workload: {len(workload)} greedy requests x max_tokens {args.max_tokens}, "
            f"all at once (idle TTFT: the first {args.idle} alone)\n\n" + "\n".join(table)
            + "\n\n" + "\n".join([ratios, *notes]) + "\n")
    print(text)
    if args.out:
        print("wrote", ", ".join(write_outputs(args.out, "cpu_path", header, text, COLUMNS,
                                               [[r[c] for c in COLUMNS] for r in rows])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
