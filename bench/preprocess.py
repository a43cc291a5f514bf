"""Image preprocessing benchmark: fastllava vs today's PIL path vs transformers, same run.

    python bench/preprocess.py [--sizes 336x336,1024x768,4000x3000] [--repeats N] [--out DIR]
                               [--threads T] [--smoke]

Per image size (W x H, random RGB noise, already decoded), for the LLaVA-NeXT anyres config
(336 px tiles, the v1.6 pinpoints) and the LLaVA-1.5 config (336 px center crop):
- `today (PIL + fp32-tile hash)`: what main's engine did per image: the pre-torch pipeline
  (tests/pil_reference.py: Pillow geometry per tile, a torch table lookup per tile), then its cache
  key, BLAKE2b over the fp32 tiles (every fastllava row includes its own key, `image_key`);
- `fastllava cpu`: `preprocess(image, cfg)` (the compiled resample passes in bands on all cores
  with the cache key, numpy geometry and lookup); `fastllava cpu, Pillow passes`: the same with
  Pillow's resampler in bands instead (a machine without a C compiler);
- `fastllava torch-cpu`: the device pipeline (exact int32 resampling in torch) run on the CPU
  (up to 1024x768 only: it is several times slower than Pillow there);
- `fastllava cuda` (when CUDA is present): `preprocess(image, cfg, device="cuda")`, timed with
  CUDA events from the decoded image to pixel_values on the GPU (host->device copy included);
- transformers' `LlavaNextImageProcessorPil` / `CLIPImageProcessorPil` (the parity target) and the
  default torchvision-backed `LlavaNextImageProcessor` / `CLIPImageProcessor`, built offline
  with the same sizes;
- the cache key: `image_key` (a BLAKE3 tree over 1 MB row chunks of the RGB pixels, on all cores)
  vs the old BLAKE2b over the fp32 tiles.
Every fastllava row is checked bit-identical to today's path before timing (exit 1 otherwise).
Each repeat runs every implementation once, interleaved, so they share the machine's load; the
figure is the median over repeats. `vs today` = today's median / this row's median.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common import fmt, run_header, write_outputs  # noqa: E402
from serving import device_name, short_commit  # noqa: E402

TODAY = "today (PIL + fp32-tile hash)"
TORCH_CPU_MAX_PIXELS = 1024 * 768   # the torch path on a CPU is slow; it is there for reference
COLUMNS = ("size", "config", "impl", "median_ms", "min_ms", "vs_today", "note")


def configs():
    from fastllava.preprocess.processor import CLIP_MEAN, CLIP_STD, NEXT_PINPOINTS, ImageProcessorConfig
    return {"next-336": ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, pinpoints=NEXT_PINPOINTS),
            "llava-336": ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD)}


def transformers_impls(name: str, img: Image.Image) -> dict:
    """transformers' processors at the same settings: the PIL class, and the default class when
    it is a different one (it falls back to the PIL class without torchvision)."""
    try:
        import transformers
    except ImportError:
        return {}
    kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    stem = "LlavaNextImageProcessor" if name.startswith("next") else "CLIPImageProcessor"
    out = {}
    for cls_name in (stem + "Pil", stem):
        cls = getattr(transformers, cls_name, None)
        proc = None if cls is None else cls(**kw)
        label = f"transformers {type(proc).__name__}"
        if proc is not None and label not in out:
            out[label] = lambda p=proc: p(img, return_tensors="pt")["pixel_values"]
    return out


def _today(img: Image.Image, cfg):
    """What main's engine did per image: the PIL pipeline, then BLAKE2b over the fp32 tiles (the
    old cache key, `image_content_hash`). fastllava's rows include their key (`image_key`)."""
    from pil_reference import reference_preprocess

    out = reference_preprocess(img, cfg)
    return dataclasses.replace(out, key=_old_key(out))


def _old_key(out) -> bytes:
    """main's `image_content_hash`: BLAKE2b over the fp32 tiles, their shape, size and grid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(out.pixel_values.shape), out.image_size, out.grid)).encode())
    h.update(out.pixel_values.contiguous().numpy().tobytes())
    return h.digest()


def pillow_passes(fn, *args):
    """fn(*args) with the compiled resample passes off (as on a machine without a C compiler)."""
    from fastllava.preprocess import native
    passes = native.passes
    native.passes = lambda: None
    try:
        return fn(*args)
    finally:
        native.passes = passes


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_size(w: int, h: int, repeats: int, errors: list[str]) -> list[dict]:
    from pil_reference import reference_preprocess

    from fastllava.preprocess.processor import image_key, preprocess

    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    rows = []
    for name, cfg in configs().items():
        impls = {TODAY: (lambda c=cfg: _today(img, c), wall_ms),
                 "fastllava cpu": (lambda c=cfg: preprocess(img, c), wall_ms),
                 "fastllava cpu, Pillow passes": (lambda c=cfg: pillow_passes(preprocess, img, c),
                                                  wall_ms)}
        if w * h <= TORCH_CPU_MAX_PIXELS:
            impls["fastllava torch-cpu"] = (lambda c=cfg: preprocess(img, c, backend="torch"), wall_ms)
        if torch.cuda.is_available():
            impls["fastllava cuda"] = (lambda c=cfg: preprocess(img, c, device="cuda"), cuda_ms)
        impls.update({k: (v, wall_ms) for k, v in transformers_impls(name, img).items()})
        ref_out = reference_preprocess(img, cfg)
        ref = ref_out.pixel_values
        impls["key: image_key (BLAKE3, uint8 pixels)"] = (lambda c=cfg: image_key(img, c), wall_ms)
        impls["key: old BLAKE2b of fp32 tiles"] = (lambda o=ref_out: _old_key(o), wall_ms)
        for label, (fn, _) in impls.items():   # warm-up, and bit-exactness of our rows
            out = fn()
            if label.startswith("fastllava") and not torch.equal(out.pixel_values.cpu(), ref):
                errors.append(f"ERROR {w}x{h} {name} {label}: pixel_values differ from today's path")
        times = {label: [] for label in impls}
        for _ in range(repeats):
            for label, (fn, clock) in impls.items():
                times[label].append(clock(fn))
        today = statistics.median(times[TODAY])
        for label, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(size=f"{w}x{h}", config=name, impl=label, median_ms=med, min_ms=min(ts),
                             vs_today=None if label.startswith("key") else today / med,
                             note="ERROR" if any(label in e for e in errors if f"{w}x{h} {name}" in e) else ""))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("size", "config", "impl", "median ms", "min ms", "vs today", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c] if r[c] != "" else None) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="336x336,1024x768,4000x3000", help="comma-separated WxH")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write <out>/preprocess-<machine>-<date>.md + .csv")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (CI)")
    args = ap.parse_args(argv[1:])
    if args.smoke:
        args.sizes, args.repeats = "64x48,37x101", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    errors: list[str] = []
    load_before = os.getloadavg()[0]     # other processes on the cores make every row slower
    rows = [r for w, h in sizes for r in bench_size(w, h, args.repeats, errors)]
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = run_header(argv, device.type)
    del header["gpu"], header["commit"]
    import PIL

    from fastllava.preprocess import native
    from fastllava.preprocess.tasks import num_workers
    compiled = "no (Pillow passes)" if native.passes() is None else "yes (cc -O3 -march=native)"
    header = {"device": device_name(device), "commit": short_commit(), **header,
              "pillow": PIL.__version__, "torch threads": str(torch.get_num_threads()),
              "preprocess threads": str(num_workers()), "compiled resample passes": compiled,
              "cpu cores": str(os.cpu_count()), "load average (1 min)": load, "repeats": str(args.repeats)}
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    text = (f"# Preprocessing benchmark\n\n{meta}\n\nDecoded RGB noise image in, pixel_values out "
            f"(median of {args.repeats} interleaved repeats). `vs today` = today's median / this row's "
            f"(today = main's PIL pipeline + its fp32-tile hash; fastllava rows include their key).\n\n"
            f"{markdown(rows)}\n" + "".join(f"\n{e}" for e in errors))
    print(text)
    if args.out:
        print("wrote", ", ".join(write_outputs(args.out, "preprocess", header, text, COLUMNS,
                                               [[r[c] for c in COLUMNS] for r in rows])))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
