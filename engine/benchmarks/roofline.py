"""Ceilings measured in the run, and the floors `bench latency` / `bench throughput` rate their
figures against (docs/performance.md "Method": count the minimum FLOPs and bytes first; the larger
time is the floor; report measured / floor, so 100 % is the hardware's limit).

Ceilings (fastllava.benchmarks.common), measured before the model is built (its KV pool then takes
the free GPU memory): `copy` = bytes read + written per second by a 1 GiB device-to-device copy;
`matmul` = 2MNK / time of F.linear at 8192^3 in the run's dtype. On a CPU (--tiny) both are
measured at small sizes (a 64 MiB host copy, 512^3), median of 5 calls: indicative only.

Counts, per the text config (L layers, h hidden, q = H·D, kv = KVH·D, e bytes per element;
linear = the weights of one layer's q, k, v, o, gate, up, down):
- decode step of B sequences at context c: bytes = all weights once + B embedding rows + the KV
  read, 2·L·kv·c·B·e (common.step_bytes; e = 1 for the KV of an fp8-KV row); FLOPs = 2·B·(L·linear + vocab·h) + 4·B·L·q·c
  (q·Kᵀ and p·V over c keys).
- prefill of P tokens: FLOPs = 2·P·L·linear + 2·L·q·P(P+1) (causal attention: P(P+1)/2 pairs,
  q·Kᵀ and p·V) + 2·h·vocab (logits of the last token only); bytes = step_bytes(B=1, c=P).
"""

from __future__ import annotations

import dataclasses

# benchmarks.common (and torch) are imported inside the functions: the `fastllava` CLI imports
# this module to build its parser, and `fastllava run` refuses bad flags and images before torch.

CEILING_COLUMNS = ("ceiling", "ms", "value", "unit", "note")

LATENCY_LEGEND = (
    "decode_gb_s = bytes a batch-1 decode step reads (all weights once + the KV at the mean "
    "context, prompt + output/2) x decode tok/s; decode_ceiling_tok_s = copy bandwidth / those "
    "bytes (the most tok/s the measured bandwidth allows); pct_copy = decode tok/s / "
    "decode_ceiling_tok_s (= decode_gb_s / copy).",
    "ttft_floor_ms = max(prefill FLOPs / matmul peak, prefill bytes / copy), prefill FLOPs = "
    "2 x decoder linear params x prompt tokens + causal attention + the last token's logits; "
    "pct_ttft_floor = ttft_floor_ms / TTFT p50 (prefill MFU when compute-bound).",
    "fastllava_x_ttft / fastllava_x_decode: the peer's TTFT / fastllava's, fastllava's decode "
    "tok/s / the peer's (> 1: fastllava is faster). A row with tp N is rated against N x the "
    "one-device ceilings (N GPUs' bandwidth and peak); a \"fastllava (fp8 KV)\" row's KV bytes "
    "count 1 per element.")
THROUGHPUT_LEGEND = (
    "roofline_out_tok_s: all prompts in one batch (an upper bound: memory may cap the batch), "
    "floor time = max(prompts x prefill FLOPs / matmul peak, weights + prompt KV bytes / copy) "
    "+ (output - 1) decode steps x max(step bytes / copy, step FLOPs / matmul peak) at the mean "
    "context (prompt + output/2); roofline_out_tok_s = prompts x output tokens / floor time; "
    "pct_roofline = out_tok_per_s / roofline_out_tok_s; a row with tp N: N x the one-device "
    "ceilings; a \"fastllava (fp8 KV)\" row: KV bytes at 1 per element.",
    "fastllava_x_tput = fastllava's out_tok_per_s / the row's (> 1: fastllava is faster); "
    "max_batch: the most requests a forward holds (fastllava: max_num_seqs; transformers: "
    "--peer-batch-size, prompts left-padded, batches run in order).")


@dataclasses.dataclass
class Ceilings:
    """GB/s and TFLOP/s measured now (None: not measured, `rows` say why)."""
    copy_gb_s: float | None
    matmul_tflop_s: float | None
    rows: list[dict]

    @property
    def measured(self) -> bool:
        return bool(self.copy_gb_s and self.matmul_tflop_s)


def measure(device: str, dtype) -> Ceilings:
    """Copy bandwidth and matmul peak on `device` in `dtype` (small sizes on a CPU)."""
    import torch

    from fastllava.benchmarks.common import copy_ceiling, matmul_ceiling

    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else 512
    note = "" if cuda else "CPU: small sizes, median of 5 calls (indicative only)"
    try:
        found = [copy_ceiling(1 << 30 if cuda else 64 << 20, device),
                 matmul_ceiling("matmul", n, n, n, dtype, device)]
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report why, run the rest
        return absent(f"not measured: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
    finally:
        if cuda:   # hand the buffers back: the KV pool is sized from the free memory
            torch.cuda.empty_cache()
    rows = [{"ceiling": r.case, "ms": r.ms, "value": r.value, "unit": r.unit, "note": note}
            for r in found]
    return Ceilings(found[0].value, found[1].value, rows)


def absent(reason: str) -> Ceilings:
    return Ceilings(None, None, [{"ceiling": name, "note": reason} for name in ("copy", "matmul")])


def decode_step_flops(t, B: int, ctx: float) -> float:
    from fastllava.benchmarks.common import linear_params

    L = t.num_hidden_layers
    return 2 * B * (L * linear_params(t) + t.vocab_size * t.hidden_size) + 4 * B * L * t.q_size * ctx


def prefill_flops(t, P: int) -> float:
    from fastllava.benchmarks.common import linear_params

    L = t.num_hidden_layers
    return (2 * P * L * linear_params(t) + 2 * L * t.q_size * P * (P + 1)
            + 2 * t.hidden_size * t.vocab_size)


def _ok(x) -> bool:
    return x is not None and x == x and x > 0     # not None, not nan, positive


def _kv_e(row: dict) -> int | None:
    """Bytes per cached K/V element of a row over fp8 KV pages (kv_cache_dtype "fp8"): 1."""
    return 1 if row.get("kv_cache_dtype") == "fp8" else None


def rate_latency(rows: list[dict], t, e: int, P: int, O: int, ceil: Ceilings) -> None:
    """Adds decode_gb_s and, with ceilings, decode_ceiling_tok_s, pct_copy, ttft_floor_ms and
    pct_ttft_floor to each timed row (LATENCY_LEGEND)."""
    from fastllava.benchmarks.common import step_bytes

    for r in rows:
        tok, ttft = r.get("decode_tok_per_s_p50"), r.get("ttft_p50_ms")
        n = r.get("tp", 1)        # a row split over n devices is rated against n devices' ceilings
        kv_e = _kv_e(r)
        per_step = step_bytes(t, 1, P + O / 2, e, None, kv_e)
        if _ok(tok):
            r["decode_gb_s"] = per_step * tok / 1e9
        if ceil.measured and _ok(tok):
            r["decode_ceiling_tok_s"] = n * ceil.copy_gb_s * 1e9 / per_step
            r["pct_copy"] = 100 * tok / r["decode_ceiling_tok_s"]
        if ceil.measured and _ok(ttft):
            r["ttft_floor_ms"] = 1e3 * max(
                prefill_flops(t, P) / (n * ceil.matmul_tflop_s * 1e12),
                step_bytes(t, 1, P, e, None, kv_e) / (n * ceil.copy_gb_s * 1e9))
            r["pct_ttft_floor"] = 100 * r["ttft_floor_ms"] / ttft


def rate_throughput(rows: list[dict], t, e: int, N: int, P: int, O: int, ceil: Ceilings) -> None:
    """Adds roofline_out_tok_s and pct_roofline to each timed row (THROUGHPUT_LEGEND)."""
    from fastllava.benchmarks.common import step_bytes

    if not ceil.measured:
        return
    ctx = P + O / 2
    for r in filter(lambda r: _ok(r.get("out_tok_per_s")), rows):
        n = r.get("tp", 1)        # a row split over n devices is rated against n devices' ceilings
        bw, peak = n * ceil.copy_gb_s * 1e9, n * ceil.matmul_tflop_s * 1e12
        kv_e = _kv_e(r)
        floor_s = (max(N * prefill_flops(t, P) / peak, step_bytes(t, N, P, e, None, kv_e) / bw)
                   + (O - 1) * max(step_bytes(t, N, ctx, e, None, kv_e) / bw,
                                   decode_step_flops(t, N, ctx) / peak))
        r["roofline_out_tok_s"] = N * O / floor_s
        r["pct_roofline"] = 100 * r["out_tok_per_s"] / r["roofline_out_tok_s"]
