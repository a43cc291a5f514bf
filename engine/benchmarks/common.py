"""Benchmark plumbing shared by the bench scripts (bench/common.py re-exports it) and
`fastllava bench kernels`: shapes, run record, timing, ceilings, output.

Method (docs/performance.md): count the floor first (minimum bytes or FLOPs), check the result
against a float32 run of the torch reference (fastllava.benchmarks.kernel_harness), time the median after warm-up
with the L2 kept cold (`time_ms`), and report every figure as a ratio to ceilings measured in the
same run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch

# The checkout's root (engine/benchmarks/ → ../..): git provenance, bench/results/.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Model:
    """The dims a kernel sees. H query heads, KVH KV heads, D head dim, mlp = intermediate size."""
    name: str
    hidden: int
    H: int
    KVH: int
    D: int
    mlp: int
    rope_theta: float = 10000.0
    vocab: int = 0          # decoders: lm_head rows (the sampler's V)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One benchmark sweep: the models and the batch/context/token counts to time them at."""
    decoders: tuple[Model, ...]
    vision: Model
    tiles: int                       # vision tower: images tiles per request
    tile_tokens: int                 # tokens per tile (CLS included)
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]        # decode: cached tokens per sequence (new one included)
    prefill_lens: tuple[int, ...]    # prefill: tokens of the one sequence
    token_counts: tuple[int, ...]    # elementwise kernels: N rows (a decode batch, a prefill)
    page_size: int
    dtype: torch.dtype


# LLaVA-1.5-13B (Vicuna-13B), LLaVA-v1.6-34B (Yi-34B), CLIP ViT-L/14-336 (quick_gelu MLP).
REAL = Shapes(
    decoders=(Model("13B", 5120, 40, 40, 128, 13824, 10000.0, 32064),
              Model("34B", 7168, 56, 8, 128, 20480, 5000000.0, 64064)),
    vision=Model("CLIP-L/336", 1024, 16, 16, 64, 4096), tiles=5, tile_tokens=577,
    decode_batches=(1, 8, 32), contexts=(600, 3000), prefill_lens=(600, 3000),
    token_counts=(32, 3000), page_size=16, dtype=torch.bfloat16)

# Same rows, tiny and odd, for the CPU interpreter. fp16: the interpreter gets bf16 tl.dot wrong.
SMOKE = Shapes(
    decoders=(Model("tiny-mha", 40, 4, 4, 16, 56, vocab=1500),
              Model("tiny-gqa", 48, 6, 2, 16, 72, 5e6, 2049)),
    vision=Model("tiny-vit", 24, 2, 2, 12, 40), tiles=3, tile_tokens=7,
    decode_batches=(1, 3), contexts=(5, 19), prefill_lens=(7, 37), token_counts=(3, 37),
    page_size=4, dtype=torch.float16)


@dataclasses.dataclass
class Row:
    """One timed implementation at one shape. value is work / time in `unit`; note says why a
    row has no time (ERROR: wrong or crashed; n/a: backend unavailable)."""
    kernel: str
    case: str
    impl: str
    ms: float | None = None
    value: float | None = None
    unit: str = ""
    pct_ceiling: float | None = None
    bar: str = ""
    vs_triton: float | None = None   # this row's time / the triton row's time at the same shape
    note: str = ""

    @property
    def is_error(self) -> bool:
        return self.note.startswith("ERROR")


def run_header(argv: Sequence[str], device: str) -> dict[str, str]:
    """What a recorded figure must carry: GPU, commit, date, versions, the exact command."""
    import triton

    def git(*args: str) -> str:
        try:
            return subprocess.run(("git", *args), cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (tracked files modified)"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreted, --smoke)"
    return {"gpu": gpu, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "none", "command": shlex.join(["python", *argv])}


def time_ms(fns: Sequence[Callable[[], object]], mode: str) -> float:
    """Median ms per call of fns[0] (or of the calls cycling through `fns`, "graph" mode).

    - "graph": one CUDA graph of back-to-back calls cycling through fns, each bound to its own
      copy of the inputs, so memory-bound kernels stream from HBM, not L2; replayed and timed with
      CUDA events (triton.testing.do_bench_cudagraph). No host launch overhead: how decode runs.
    - "eager": triton.testing.do_bench: warm-up, then each call timed alone after zeroing a
      256 MB buffer (cold L2). For code that syncs with the host, which a graph cannot capture.
    - "cpu": one wall-clock call (--smoke: proves the plumbing, means nothing).
    """
    if mode == "cpu":
        t0 = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    torch.cuda.synchronize()   # inputs just built on the default stream; graph mode uses another
    if mode == "eager":
        return triton.testing.do_bench(fns[0], warmup=25, rep=100, return_mode="median")
    if mode != "graph":
        raise ValueError(f"mode must be graph, eager or cpu, got {mode!r}")
    calls = itertools.cycle(fns)
    return triton.testing.do_bench_cudagraph(lambda: next(calls)(), rep=50, return_mode="median")


def copy_ceiling(nbytes: int = 1 << 30, device: str = "cuda") -> Row:
    """Copy of nbytes (1 GiB device-to-device; on the CPU a host copy, e.g. 64 MiB, to keep a
    smoke run short); GB/s counts bytes read + written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _ceiling_ms(lambda: dst.copy_(src), device)
    size = f"{nbytes >> 30} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"
    where = "d2d" if torch.device(device).type == "cuda" else "host"
    return Row("ceiling", f"copy {size} {where}", "torch", ms, 2 * nbytes / ms / 1e6, "GB/s")


def matmul_ceiling(label: str, M: int, N: int, K: int, dtype: torch.dtype,
                   device: str = "cuda") -> Row:
    """F.linear(a (M, K), w (N, K)): the layout the model's projections use; 2MNK FLOPs."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
    w = torch.randn(N, K, device=device, dtype=dtype, generator=gen)
    ms = _ceiling_ms(lambda: torch.nn.functional.linear(a, w), device)
    return Row("ceiling", f"{label} {M}x{N}x{K}", "torch", ms, 2 * M * N * K / ms / 1e9, "TFLOP/s")


def _ceiling_ms(fn: Callable[[], object], device: str, cpu_calls: int = 5) -> float:
    """CUDA: do_bench median (cold L2). CPU: median wall time of `cpu_calls` after one warm-up."""
    if torch.device(device).type == "cuda":
        return time_ms([fn], "eager")
    fn()
    times = []
    for _ in range(cpu_calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def linear_params(t) -> int:
    """Weights of one decoder layer's linears: q, k, v, o and gate, up, down."""
    h = t.hidden_size
    return h * (t.q_size + 2 * t.kv_size) + t.q_size * h + 3 * h * t.intermediate_size


def step_bytes(t, B: int, ctx: float, e: int, linear_e: int | None = None,
               kv_e: int | None = None) -> float:
    """Minimum bytes one decode step reads: weights once + KV of B sequences at ctx tokens.
    linear_e: bytes per decoder linear weight when not e (1 for FP8; its fp32 per-channel
    scales, < 0.1 % of those bytes, are left out); kv_e: bytes per cached K/V element when not
    e (1 for kv_cache_dtype "fp8")."""
    h, L = t.hidden_size, t.num_hidden_layers
    rest = L * 2 * h + h + t.vocab_size * h + B * h   # norms, final norm, lm_head, embed rows
    return (L * linear_params(t) * (linear_e or e) + rest * e
            + 2 * L * t.kv_size * ctx * B * (kv_e or e))


def variants(quantization: str | None, kv_cache_dtype: str) -> tuple[tuple[str | None, str], ...]:
    """The model dtype first (the reference every ratio divides by), then every other combination
    of the fp8 weights and fp8 KV pages asked for."""
    return tuple((q, kv) for q in dict.fromkeys((None, quantization))
                 for kv in dict.fromkeys(("auto", kv_cache_dtype)))


def variant_suffix(variant: tuple[str | None, str]) -> str:
    """" (fp8)", " (fp8 KV)", " (fp8, fp8 KV)" or "" (the model dtype) after a bench row's impl."""
    q, kv = variant
    parts = [q] * (q is not None) + ["fp8 KV"] * (kv == "fp8")
    return f" ({', '.join(parts)})" if parts else ""


COLUMNS = ("kernel", "case", "impl", "ms", "value", "unit", "pct_ceiling", "bar", "vs_triton",
           "note")


def fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x).replace("|", "/")


def markdown(rows: Sequence[Row]) -> str:
    head = ("kernel", "case", "impl", "ms", "value", "unit", "% ceiling", "bar", "ms / triton ms",
            "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pct = None if r.pct_ceiling is None else f"{100 * r.pct_ceiling:.1f}%"
        cells = (r.kernel, r.case, r.impl, r.ms, r.value, r.unit, pct, r.bar or None,
                 r.vs_triton, r.note or None)
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def report(header: dict[str, str], ceilings: Sequence[Row], rows: Sequence[Row]) -> str:
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    ceil = markdown(ceilings) if ceilings else "skipped (--smoke: no GPU ceilings)"
    legend = ("% ceiling: GB/s rows / the copy bandwidth, TFLOP/s rows / the 8192^3 matmul. "
              "bar: the performance.md target (H100). ms / triton ms > 1: triton is faster.")
    return (f"# Kernel benchmark\n\n{meta}\n\n## Ceilings (measured in this run)\n\n{ceil}\n\n"
            f"## Kernels\n\n{legend}\n\n{markdown(rows)}\n")


def write_outputs(out_dir: str, stem: str, header: dict[str, str], text: str,
                  columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """<out>/<stem>-<device>-<UTC date-time>.md (the report) and .csv (one line per row of cells,
    matching `columns`, each prefixed by the run record)."""
    os.makedirs(out_dir, exist_ok=True)
    device = header.get("gpu") or header.get("device") or "unknown"
    slug = re.sub(r"[^a-z0-9]+", "-", device.split("(")[0].lower()).strip("-")[:40].strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    base = os.path.join(out_dir, f"{stem}-{slug or 'cpu'}-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(text)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow((*header, *columns))
    for cells in rows:
        writer.writerow((*header.values(), *("" if c is None else c for c in cells)))
    with open(base + ".csv", "w", newline="") as f:
        f.write(buf.getvalue())
    return [base + ".md", base + ".csv"]


def require_compiled_gpu(script: str, smoke_means: str) -> None:
    """Real-shape runs need CUDA and compiled kernels; refuse clearly otherwise."""
    if not torch.cuda.is_available():
        fail(f"bench/{script} needs a CUDA GPU for the real shapes; none is visible here. "
             f"Run with --smoke to check the script's plumbing on the CPU ({smoke_means}).")
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        fail("TRITON_INTERPRET is set: the real-shape run would time the CPU interpreter. "
             "Unset it (or use --smoke).")


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)
