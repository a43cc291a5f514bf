"""One command for a GPU slice: validate and measure everything, in ≤ 9 minutes from a cold start.

    python bench/gpu_suite.py                 # on one H100/H200, no network needed
    python bench/gpu_suite.py --only decode-13b,ttft --budget 300
    python bench/gpu_suite.py --smoke         # every part at tiny shapes on the CPU (CI)

Parts, in order (each a subprocess with its own time budget; `--only` picks some):
  gpu-tests    pytest -m gpu over tests/ (numerics of every kernel in bf16 at real shapes, the
               warm-up compiling nothing after ready, CUDA graphs)
  kernels      bench/kernels.py: every Triton kernel at the 13B / 34B / CLIP shapes vs ceilings
  decode-13b   bench/decode.py: LLaVA-1.5-13B batch 1/8/32, transformers eager beside it
  decode-34b   bench/decode.py: LLaVA-v1.6-34B batch 1 and 8 where the KV fits, no peer
  ttft         bench/ttft.py: 13B and 34B, one 1024x768 JPEG, idle
  preprocess   bench/preprocess.py: the image-preprocessing rows (CPU and CUDA)
  serving      bench/serving.py: a short serving run of the tiny random LLaVA-NeXT on the GPU
  fp8-34b      bench/decode.py: LLaVA-v1.6-34B batch 1 in bf16, FP8 weights, FP8 KV and both,
               one run, with the fp8 / bf16 tok/s ratio (issue 15's >= 1.7x); last, so the
               default budget runs it only when time is left (or `--only fp8-34b`)
Every part writes its tables (.md + .csv, each with GPU, commit, date, versions, command, and
the performance.md bar beside each figure where the part has one) and its full log into one
folder, bench/results/suite-<gpu>-<UTC time>/ (copied to $OUT/ after every part when $OUT is
set, so a cut-off slice still returns what finished). A failing or timed-out part is recorded and
the suite goes on; a part whose budget no longer fits in what is left of --budget is skipped and
reported. SUMMARY.md lists every part's status and time and embeds its tables. Exit status 1 if
any part failed or timed out (skips alone do not fail the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
MIN_START_S = 20        # never start a part with less than this left of its budget


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    budget_s: int               # on the GPU; --smoke parts get SMOKE_BUDGET_S
    gpu: list[str]              # command (after `python`) on the GPU; {out} = the suite folder
    smoke: list[str]            # the same part at tiny shapes on the CPU


SMOKE_BUDGET_S = 60
PARTS = (
    Part("gpu-tests", 110,
         ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests",
          "--junitxml={out}/gpu-tests.xml"],
         ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
          "tests/kernels/test_rotary_write_kv.py", "--junitxml={out}/gpu-tests.xml"]),
    Part("kernels", 70, ["bench/kernels.py", "--out", "{out}"],
         ["bench/kernels.py", "--smoke", "--only", "rms_norm", "--out", "{out}"]),
    Part("decode-13b", 90,
         ["bench/decode.py", "--model", "llava-1.5-13b", "--batches", "1,8,32", "--peers",
          "eager", "--windows", "3", "--out", "{out}"],
         ["bench/decode.py", "--smoke", "--peers", "none", "--out", "{out}"]),
    Part("decode-34b", 80,
         ["bench/decode.py", "--model", "llava-v1.6-34b", "--batches", "1,8", "--peers", "none",
          "--windows", "3", "--out", "{out}"],
         ["bench/decode.py", "--smoke", "--peers", "none", "--out", "{out}"]),
    Part("ttft", 100, ["bench/ttft.py", "--image", "1024x768", "--out", "{out}"],
         ["bench/ttft.py", "--smoke", "--out", "{out}"]),
    Part("preprocess", 30, ["bench/preprocess.py", "--repeats", "5", "--out", "{out}"],
         ["bench/preprocess.py", "--smoke", "--sizes", "64x48", "--out", "{out}"]),
    Part("serving", 40, ["bench/serving.py", "--requests", "16", "--device", "cuda", "--out",
                         "{out}"],
         ["bench/serving.py", "--smoke", "--device", "cpu", "--requests", "4", "--out", "{out}"]),
    Part("fp8-34b", 120,
         ["bench/decode.py", "--model", "llava-v1.6-34b", "--batches", "1", "--peers", "none",
          "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--windows", "3", "--out", "{out}"],
         ["bench/decode.py", "--smoke", "--peers", "none", "--quantization", "fp8",
          "--out", "{out}"]),
)
NAMES = tuple(p.name for p in PARTS)


@dataclasses.dataclass
class Result:
    part: str
    status: str                 # ok | FAILED (rc N) | TIMEOUT | skipped (...)
    seconds: float = 0.0
    budget_s: int = 0
    files: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status.startswith(("FAILED", "TIMEOUT"))


def run_part(part: Part, cmd: list[str], timeout_s: float, out: str, env: dict) -> Result:
    before = set(os.listdir(out))
    log = os.path.join(out, f"{part.name}.log")
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ python {' '.join(cmd)}\n")
        f.flush()
        # Own process group: a timeout kills the part's children (compile workers, servers) too.
        proc = subprocess.Popen([PY, *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"FAILED (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = f"TIMEOUT after {timeout_s:.0f} s"
    new = tuple(sorted(set(os.listdir(out)) - before))
    return Result(part.name, status, time.monotonic() - t0, part.budget_s, new)


def summary(results: list[Result], header: dict[str, str], out: str) -> str:
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    lines = ["| part | status | s | budget s | files |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.part} | {r.status} | {r.seconds:.0f} | {r.budget_s} | "
                     f"{', '.join(r.files) or '-'} |")
    text = f"# GPU suite\n\n{meta}\n\n{chr(10).join(lines)}\n"
    for r in results:      # every part's own tables, bars beside the figures
        for name in r.files:
            if name.endswith(".md"):
                with open(os.path.join(out, name)) as f:
                    body = re.sub(r"^#", "###", f.read(), flags=re.M)
                text += f"\n## {r.part}: {name}\n\n{body}\n"
    return text


def copy_out(out: str) -> None:
    dest = os.environ.get("OUT")
    if dest:
        shutil.copytree(out, os.path.join(dest, os.path.basename(out)), dirs_exist_ok=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=530,
                    help="seconds for the whole suite (default 530: 9 minutes less start-up)")
    ap.add_argument("--only", help=f"comma-separated parts of {','.join(NAMES)}")
    ap.add_argument("--out", help="parent folder (default bench/results/)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, < 1 minute")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"unknown parts {unknown}; known: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    start = time.monotonic()
    sys.path.insert(0, HERE)
    import torch
    from common import run_header
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_suite.py needs a CUDA GPU; none is visible here. Run --smoke to check "
              "the plumbing on the CPU.", file=sys.stderr)
        return 2
    header = run_header(["bench/gpu_suite.py", *argv], "cpu" if args.smoke else "cuda")
    slug = re.sub(r"[^a-z0-9]+", "-", header["gpu"].split("(")[0].lower()).strip("-") or "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    out = os.path.join(args.out or os.path.join(HERE, "results"), f"suite-{slug}-{stamp}")
    os.makedirs(out, exist_ok=True)
    # No network on the GPU machine: never let transformers or the hub try it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = []
    for part in PARTS:
        if part.name not in names:
            continue
        budget = SMOKE_BUDGET_S if args.smoke else part.budget_s
        left = args.budget - (time.monotonic() - start)
        if left < min(budget, MIN_START_S) or (not args.smoke and left < budget / 2):
            results.append(Result(part.name, f"skipped ({left:.0f} s left of --budget, part "
                                              f"needs {budget} s)", 0.0, budget))
            print(f"[suite] {part.name}: {results[-1].status}", flush=True)
            continue
        cmd = [a.replace("{out}", out) for a in (part.smoke if args.smoke else part.gpu)]
        print(f"[suite] {part.name}: python {' '.join(cmd)} (budget {min(budget, left):.0f} s)",
              flush=True)
        results.append(run_part(part, cmd, min(budget, left), out, env))
        results[-1].budget_s = budget
        print(f"[suite] {part.name}: {results[-1].status} in {results[-1].seconds:.0f} s",
              flush=True)
        with open(os.path.join(out, "SUMMARY.md"), "w") as f:
            f.write(summary(results, header, out))
        copy_out(out)
    text = summary(results, header, out)
    with open(os.path.join(out, "SUMMARY.md"), "w") as f:
        f.write(text)
    copy_out(out)
    print(text)
    print(f"[suite] wrote {out} in {time.monotonic() - start:.0f} s")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
