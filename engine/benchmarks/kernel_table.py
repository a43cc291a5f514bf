"""Kernel benchmark: every Triton kernel at the real LLaVA shapes, next to its torch reference and
torch SDPA, in roofline units (GB/s or TFLOP/s, % of the ceilings measured in the same run).

    python bench/kernels.py [--out bench/results/] [--smoke] [--only NAME]
    python -m fastllava.benchmarks.kernel_table ...   # the same, from an installed package
    fastllava bench kernels ...                       # the same into a results folder + figure

Floors: attention FLOPs 4*T*T*H*D per sequence (halved when causal); memory-bound kernels count
the minimum bytes (each input read once, each output written once); paged decode counts the KV
bytes it must read plus q, out and the block table. Each implementation is first checked against
the reference run in float32 (rel. error <= 2x the same-dtype reference's + REL_FLOOR), then timed;
a wrong or crashing row is kept with an ERROR note and the exit status is 1.
--smoke runs the same rows at tiny shapes on the CPU (kernels interpreted, no ceilings).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Iterator

import torch
import torch.nn.functional as F

from fastllava.benchmarks.common import (COLUMNS, REAL, REPO, SMOKE, Row, Shapes, copy_ceiling,
                                         matmul_ceiling, report, require_compiled_gpu,
                                         run_header, write_outputs)
from fastllava.benchmarks.kernel_harness import Case, run_case

SDPA_BACKENDS = (("sdpa flash", "FLASH_ATTENTION"), ("sdpa cudnn", "CUDNN_ATTENTION"),
                 ("sdpa efficient", "EFFICIENT_ATTENTION"))
DECODE_BAR, PREFILL_BAR = 0.85, 600.0   # performance.md targets (H100)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, device=gen.device, dtype=dtype)


def _qkv(gen, N, H, KVH, D, dtype):
    """q (N, H, D), k, v (N, KVH, D) as strided views of one fused qkv GEMM output, as in the model."""
    qkv = _randn(gen, N, (H + 2 * KVH) * D, dtype=dtype)
    q, k, v = qkv.split((H * D, KVH * D, KVH * D), dim=-1)
    return q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D)


def _sdpa_peers(*, causal: bool, scale: float) -> dict:
    """torch SDPA on dense q (B, H, T, D), k, v (B, KVH, L, D), one entry per backend; a backend
    missing from this torch or refusing the inputs raises RuntimeError (the row reads n/a)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    impls = {}
    for label, attr in SDPA_BACKENDS:
        def run(q, k, v, *, backend=getattr(SDPBackend, attr, None), attr=attr, **_):
            if backend is None:
                raise RuntimeError(f"SDPBackend.{attr} does not exist in torch {torch.__version__}")
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                      enable_gqa=q.shape[1] != k.shape[1])
        impls[label] = run
    return impls


def decode_cases(sh: Shapes, gen) -> Iterator[Case]:
    """Over caches in the model dtype and, tagged "fp8 KV", in float8_e4m3fn (kv_cache_dtype
    "fp8": half the KV bytes; the SDPA peers get the pages dequantized, outside the timing)."""
    from fastllava.kernels import paged_decode_attention as mod
    S, dt = sh.page_size, sh.dtype
    for m in sh.decoders:
        for ctx in sh.contexts:
            for B in sh.decode_batches:
                for kv_dt in (dt, torch.float8_e4m3fn):
                    yield _decode_case(mod, m, ctx, B, S, dt, kv_dt, gen)


def _decode_case(mod, m, ctx: int, B: int, S: int, dt, kv_dt, gen) -> Case:
    pages = -(-ctx // S)
    k_cache = _randn(gen, B * pages, S, m.KVH, m.D, dtype=dt).to(kv_dt)
    v_cache = _randn(gen, B * pages, S, m.KVH, m.D, dtype=dt).to(kv_dt)
    tables = torch.randperm(B * pages, generator=gen, device=gen.device)
    tables = tables.view(B, pages).to(torch.int32)   # shuffled pages, as after churn
    lens = torch.full((B,), ctx, dtype=torch.int32, device=gen.device)
    q = _qkv(gen, B, m.H, m.KVH, m.D, dt)[0]
    kv_bytes = 2 * B * ctx * m.KVH * m.D * kv_dt.itemsize
    work = kv_bytes + 2 * B * m.H * m.D * dt.itemsize + tables.numel() * 4 + B * 4

    def dense(args, ctx=ctx):  # SDPA inputs, gathered untimed: k, v (B, KVH, ctx, D)
        q, k_cache, v_cache, tables = args[:4]
        k, v = (c[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).to(q.dtype).contiguous()
                for c in (k_cache, v_cache))
        return q.unsqueeze(2), k, v
    tag = " fp8 KV" if kv_dt != dt else ""
    return Case("paged_decode_attention", f"{m.name} B={B} ctx={ctx}{tag}", work, "GB/s",
                (q, k_cache, v_cache, tables, lens),
                {"triton": mod.paged_decode_attention,
                 "torch ref": mod.paged_decode_attention_ref,
                 **_sdpa_peers(causal=False, scale=m.D ** -0.5)},
                {"scale": m.D ** -0.5}, prep=dense, view=lambda o: o[:, :, 0],
                bar=lambda v, pct: "" if pct is None else
                f">=85% BW: {'yes' if pct >= DECODE_BAR else 'NO'}")


def prefill_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import prefill_attention as mod
    runs = [(m, T, 1, True) for m in sh.decoders for T in sh.prefill_lens]
    runs.append((sh.vision, sh.tile_tokens, sh.tiles, False))   # CLIP tiles: bidirectional
    for m, T, B, causal in runs:
        q, k, v = _qkv(gen, B * T, m.H, m.KVH, m.D, sh.dtype)
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=gen.device)
        flops = 4 * B * T * T * m.H * m.D / (2 if causal else 1)

        def dense(args, B=B, T=T):  # SDPA inputs (B, h, T, D) contiguous, built untimed
            return tuple(x.view(B, T, *x.shape[1:]).transpose(1, 2).contiguous() for x in args[:3])
        label = f"{m.name} T={T} causal" if causal else f"{m.name} {B}x{T} bidirectional"
        yield Case("prefill_attention", label, flops, "TFLOP/s", (q, k, v, cu),
                   {"triton": mod.prefill_attention, "torch ref": mod.prefill_attention_ref,
                    **_sdpa_peers(causal=causal, scale=m.D ** -0.5)},
                   {"causal": causal, "scale": m.D ** -0.5}, prep=dense,
                   view=lambda o: o.transpose(1, 2).flatten(0, 1),
                   bar=None if m.D != 128 else
                   lambda v, pct: f">=600 TFLOP/s: {'yes' if v >= PREFILL_BAR else 'NO'}")


def mixed_step_cases(sh: Shapes, gen) -> Iterator[Case]:
    """A mixed step: B running decodes (context ctx) ride with a T-token prompt chunk over a
    P-token cached prefix (a new image prompt arriving). The launcher runs the decodes through the
    paged decode kernel (decode_rows = B, the engine's path); the second row is the same call
    with every row in the prefill kernel, one 128-row query tile per head per decode token."""
    from fastllava.kernels import prefill_attention as mod
    S, B, ctx = sh.page_size, sh.decode_batches[-1], sh.contexts[-1]
    P, T = sh.contexts[0], sh.prefill_lens[0]
    for m in sh.decoders:
        q, k, v = _qkv(gen, B + T, m.H, m.KVH, m.D, sh.dtype)
        widths = [-(-ctx // S)] * B + [-(-(P + T) // S)]
        pages = torch.randperm(sum(widths), generator=gen, device=gen.device)
        tables = torch.zeros(B + 1, max(widths), dtype=torch.int32, device=gen.device)
        for b, page_ids in enumerate(pages.split(widths)):
            tables[b, :len(page_ids)] = page_ids
        caches = [_randn(gen, sum(widths), S, m.KVH, m.D, dtype=sh.dtype) for _ in range(2)]
        # Each decode's own token is in the cache already (rotary_write_kv runs first), at ctx - 1.
        slots = tables[:B, (ctx - 1) // S].long() * S + (ctx - 1) % S
        for cache, new in zip(caches, (k, v)):
            cache.view(-1, m.KVH, m.D)[slots] = new[:B]
        cu = torch.tensor([*range(B + 1), B + T], dtype=torch.int32, device=gen.device)
        prefix = torch.tensor([ctx - 1] * B + [P], dtype=torch.int32, device=gen.device)
        flops = 4 * m.H * m.D * (B * ctx + T * (P + T / 2))

        def launcher(fn, decode_rows):
            def run(q, k, v, cu, kc, vc, bt, pl, **kw):
                return fn(q, k, v, cu, k_cache=kc, v_cache=vc, block_tables=bt, prefix_lens=pl,
                          decode_rows=decode_rows, **kw)
            return run
        yield Case("prefill_attention", f"{m.name} mixed: {B} decodes ctx={ctx} + T={T} P={P}",
                   flops, "TFLOP/s", (q, k, v, cu, *caches, tables, prefix),
                   {"triton": launcher(mod.prefill_attention, B),
                    "torch ref": launcher(mod.prefill_attention_ref, 0),
                    "triton, decodes as prefill rows": launcher(mod.prefill_attention, 0)},
                   {"causal": True, "scale": m.D ** -0.5})


def _fresh(gen, build):
    """Rebuildable inputs for a kernel that writes into them: same seed, same tensors, same views."""
    seed = int(torch.randint(1 << 30, (1,), generator=gen, device=gen.device))
    return lambda: build(torch.Generator(device=gen.device).manual_seed(seed))


def _token_rows(sh: Shapes):
    return [(m, N, f"{m.name} N={N}") for m in sh.decoders for N in sh.token_counts]


def kv_write_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import kv_cache_write as mod
    S, dt, e = sh.page_size, sh.dtype, sh.dtype.itemsize
    for (m, N, tag), kv_dt in ((row, kv) for row in _token_rows(sh)
                               for kv in (dt, torch.float8_e4m3fn)):   # fp8: quantize on store
        P = -(-N // S) + 1

        def build(g, m=m, N=N, P=P, kv_dt=kv_dt):  # k, v: views of a fused qkv; N distinct slots
            k, v = _qkv(g, N, m.KVH, m.KVH, m.D, dt)[1:]
            caches = [_randn(g, P, S, m.KVH, m.D, dtype=dt).to(kv_dt) for _ in range(2)]
            return (k, v, *caches, torch.randperm(P * S, generator=g, device=g.device)[:N])
        make = _fresh(gen, build)
        yield Case("kv_cache_write", tag + (" fp8 KV" if kv_dt != dt else ""),
                   2 * N * m.KVH * m.D * (e + kv_dt.itemsize) + 8 * N, "GB/s", make(),
                   {"triton": mod.write_kv, "torch ref": mod.write_kv_ref}, make=make,
                   outputs=lambda ret, a: (a[2].view(torch.uint8), a[3].view(torch.uint8))
                   if a[2].dtype == torch.float8_e4m3fn else (a[2], a[3]), exact=True)


def rms_norm_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import rms_norm as mod
    dt, e = sh.dtype, sh.dtype.itemsize
    for m, N, tag in _token_rows(sh):
        make = _fresh(gen, lambda g, m=m, N=N: (
            _randn(g, N, m.hidden, dtype=dt), 1 + 0.1 * _randn(g, m.hidden, dtype=dt), 1e-5,
            _randn(g, N, m.hidden, dtype=dt)))
        # reads x, residual, weight; writes out, residual_out
        yield Case("rms_norm", f"{tag} +residual", (4 * N + 1) * m.hidden * e, "GB/s", make(),
                   {"triton": mod.rms_norm, "torch ref": mod.rms_norm_ref}, make=make)


def row_cumsum_cases(sh: Shapes, gen) -> Iterator[Case]:
    """The sampler's top-p scan: the largest decode batch of sorted probabilities per vocabulary."""
    from fastllava.kernels import row_cumsum as mod
    B = sh.decode_batches[-1]
    for m in sh.decoders:
        x = _randn(gen, B, m.vocab, dtype=torch.float32).softmax(-1).sort(-1).values
        yield Case("row_cumsum", f"{m.name} B={B} V={m.vocab}", 2 * B * m.vocab * 4, "GB/s",
                   (x,), {"triton": mod.row_cumsum, "torch ref": mod.row_cumsum_ref})


def rotary_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import rotary as mod
    dt, e = sh.dtype, sh.dtype.itemsize
    for m, N, tag in _token_rows(sh):
        pos = torch.arange(N, device=gen.device) + 7
        inv_freq = mod.rope_inv_freq(m.D, m.rope_theta).to(gen.device)
        make = _fresh(gen, lambda g, m=m, N=N, pos=pos, inv_freq=inv_freq: (
            *_qkv(g, N, m.H, m.KVH, m.D, dt)[:2], *mod.rope_cos_sin(pos, inv_freq, dt)))
        # q, k read and written in place; cos, sin read
        yield Case("rotary", tag, (2 * N * (m.H + m.KVH) + 2 * N) * m.D * e, "GB/s", make(),
                   {"triton": mod.rotary, "torch ref": mod.rotary_ref}, make=make)


def rotary_write_kv_cases(sh: Shapes, gen) -> Iterator[Case]:
    """The decoder's fused op: rotary of q and k from the position table + the KV write."""
    from fastllava.kernels import rotary as rot
    from fastllava.kernels import rotary_write_kv as mod
    S, dt, e = sh.page_size, sh.dtype, sh.dtype.itemsize
    for m, N, tag in _token_rows(sh):
        P, L = -(-N // S) + 1, 4096
        cos, sin = rot.rope_cos_sin(torch.arange(L, device=gen.device),
                                    rot.rope_inv_freq(m.D, m.rope_theta).to(gen.device), dt)

        def build(g, m=m, N=N, P=P, cos=cos, sin=sin):
            q, k, v = _qkv(g, N, m.H, m.KVH, m.D, dt)
            caches = [_randn(g, P, S, m.KVH, m.D, dtype=dt) for _ in range(2)]
            pos = torch.randint(0, L, (N,), generator=g, device=g.device)
            return (q, k, v, pos, cos, sin, *caches,
                    torch.randperm(P * S, generator=g, device=g.device)[:N])
        make = _fresh(gen, build)
        # q, k read and written; v read; k, v written to the cache; N rows of cos and sin read
        nbytes = (2 * N * (m.H + m.KVH) + N * m.KVH + 2 * N * m.KVH + 2 * N) * m.D * e + 16 * N
        yield Case("rotary_write_kv", tag, nbytes, "GB/s", make(),
                   {"triton": mod.rotary_write_kv, "torch ref": mod.rotary_write_kv_ref},
                   make=make, outputs=lambda ret, a: (*ret, a[6], a[7]))


def silu_and_mul_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import silu_and_mul as mod
    for m, N, tag in _token_rows(sh):
        yield Case("silu_and_mul", f"{tag} I={m.mlp}", 3 * N * m.mlp * sh.dtype.itemsize, "GB/s",
                   (_randn(gen, N, 2 * m.mlp, dtype=sh.dtype),),
                   {"triton": mod.silu_and_mul, "torch ref": mod.silu_and_mul_ref})


def gelu_cases(sh: Shapes, gen) -> Iterator[Case]:
    from fastllava.kernels import gelu as mod
    N, I = sh.tiles * sh.tile_tokens, sh.vision.mlp
    yield Case("gelu", f"{sh.vision.name} quick N={N} I={I}", 2 * N * I * sh.dtype.itemsize,
               "GB/s", (_randn(gen, N, I, dtype=sh.dtype), "quick"),
               {"triton": mod.gelu, "torch ref": mod.gelu_ref})


def fp8_linear_cases(sh: Shapes, gen) -> Iterator[Case]:
    """FP8 decoder GEMMs (--quantization fp8): per-token activation scales computed in the call,
    per-channel weight scales; the launcher is torch._scaled_mm, not a Triton kernel."""
    from fastllava.kernels import fp8_linear as mod
    for m, N, tag in _token_rows(sh):
        for name, M, K in (("gate_up", 2 * m.mlp, m.hidden), ("down", m.hidden, m.mlp)):
            w, w_scale = mod.quantize_fp8_rows(_randn(gen, M, K, dtype=torch.float32) * K ** -0.5)
            yield Case("fp8_linear", f"{tag} {name} {M}x{K}", 2 * N * M * K, "TFLOP/s",
                       (_randn(gen, N, K, dtype=sh.dtype), w, w_scale),
                       {"scaled_mm": mod.fp8_linear, "torch ref": mod.fp8_linear_ref})


def sdpa_attention_cases(sh: Shapes, gen) -> Iterator[Case]:
    """The CPU path's attention (backend "torch"): per-sequence flash SDPA for prefill, a padded
    gather + masked SDPA per length bucket for paged decode."""
    from fastllava.kernels import paged_decode_attention as dec
    from fastllava.kernels import prefill_attention as pre
    from fastllava.kernels import sdpa_attention as mod
    S, dt = sh.page_size, sh.dtype
    for m in sh.decoders:
        T = sh.prefill_lens[0]
        q, k, v = _qkv(gen, T, m.H, m.KVH, m.D, dt)
        cu = torch.tensor([0, T], dtype=torch.int32, device=gen.device)
        yield Case("sdpa_attention", f"{m.name} prefill T={T} causal", 2 * T * T * m.H * m.D,
                   "TFLOP/s", (q, k, v, cu),
                   {"torch sdpa": mod.prefill_attention_sdpa, "torch ref": pre.prefill_attention_ref},
                   {"causal": True, "scale": m.D ** -0.5})
        ctx, B = sh.contexts[0], sh.decode_batches[0]
        pages = -(-ctx // S)
        caches = [_randn(gen, B * pages, S, m.KVH, m.D, dtype=dt) for _ in range(2)]
        tables = torch.randperm(B * pages, generator=gen, device=gen.device).view(B, pages)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=gen.device)
        yield Case("sdpa_attention", f"{m.name} decode B={B} ctx={ctx}",
                   2 * B * ctx * m.KVH * m.D * dt.itemsize, "GB/s",
                   (_randn(gen, B, m.H, m.D, dtype=dt), *caches, tables.to(torch.int32), lens),
                   {"torch sdpa": mod.paged_decode_attention_sdpa,
                    "torch ref": dec.paged_decode_attention_ref}, {"scale": m.D ** -0.5})


BUILDERS = {"paged_decode_attention": decode_cases,
            "prefill_attention": lambda sh, gen: itertools.chain(prefill_cases(sh, gen),
                                                                 mixed_step_cases(sh, gen)),
            "kv_cache_write": kv_write_cases, "rms_norm": rms_norm_cases,
            "rotary": rotary_cases, "rotary_write_kv": rotary_write_kv_cases,
            "row_cumsum": row_cumsum_cases, "silu_and_mul": silu_and_mul_cases,
            "gelu": gelu_cases, "fp8_linear": fp8_linear_cases,
            "sdpa_attention": sdpa_attention_cases}
KERNELS = tuple(BUILDERS)


def measure_ceilings(sh: Shapes) -> list[Row]:
    rows = [copy_ceiling(), matmul_ceiling("matmul", 8192, 8192, 8192, sh.dtype)]
    for m in sh.decoders:
        for T in sh.prefill_lens:
            for name, n, k in (("qkv", (m.H + 2 * m.KVH) * m.D, m.hidden),
                               ("o", m.hidden, m.H * m.D), ("gate_up", 2 * m.mlp, m.hidden),
                               ("down", m.hidden, m.mlp)):
                rows.append(matmul_ceiling(f"{m.name} {name}", T, n, k, sh.dtype))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the .md and .csv (GPU default: bench/results/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, kernels interpreted, no ceilings")
    parser.add_argument("--only", choices=KERNELS, help="benchmark this kernel only")
    args = parser.parse_args(argv[1:])
    if args.smoke:   # must precede the first kernel import: @triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        require_compiled_gpu("kernels.py", "interpreted kernels")
    on_gpu = not args.smoke
    device = "cuda" if on_gpu else "cpu"
    out = args.out or (os.path.join(REPO, "bench", "results") if on_gpu else None)
    sh = REAL if on_gpu else SMOKE
    header = run_header(argv, device)
    ceilings = measure_ceilings(sh) if on_gpu else []
    copy_bw = ceilings[0].value if ceilings else None
    matmul = ceilings[1].value if ceilings else None
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[Row] = []
    for stem in [args.only] if args.only else KERNELS:
        try:
            for case in BUILDERS[stem](sh, gen):   # built lazily: few shapes alive at once
                rows += run_case(case, matmul if case.unit == "TFLOP/s" else copy_bw, on_gpu)
                del case
        except Exception as exc:  # noqa: BLE001 - e.g. a launcher missing from its module
            rows.append(Row(stem, "-", "triton", note=f"ERROR: {type(exc).__name__}: {exc}"))
        if on_gpu:
            torch.cuda.empty_cache()
    text = report(header, ceilings, rows)
    print(text)
    if out:
        print("wrote", ", ".join(write_outputs(out, "kernels", header, text, COLUMNS,
                                                   [[getattr(r, c) for c in COLUMNS] for r in ceilings + rows])))
    errors = [r for r in rows if r.is_error]
    if errors:
        print(f"{len(errors)} row(s) failed: see the ERROR notes above", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
