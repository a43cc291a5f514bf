"""`fastllava bench latency | throughput | kernels | suite` in their CPU smoke modes: each writes
report.md / results.csv / results.json with the run record and real PNG figures; every flag has
help; the real-shape runs refuse a machine without a GPU with a clear message. latency and
throughput put transformers beside fastllava and rate every figure against the copy / matmul
ceilings measured in the run (the counts re-derived here from the config, not from roofline.py)."""

from __future__ import annotations

import argparse
import socket

import pytest
import torch

from benchkit import check_results, monotone_percentiles, rows_of
from fastllava.benchmarks.common import step_bytes
from fastllava.cli import build_parser, main
from fastllava.weights.random import TINY_CONFIG, llava_config

SUBCOMMANDS = ("latency", "throughput", "serve", "kernels", "suite")
TINY_TEXT = llava_config(TINY_CONFIG).text   # --tiny runs fp32 on the CPU: 4 bytes per element
CEILINGS = "Ceilings (measured in this run)"


def ceilings(data: dict) -> tuple[float, float]:
    """(copy GB/s, matmul TFLOP/s) of a run's Ceilings table."""
    copy, matmul = rows_of(data, CEILINGS)
    assert copy["ceiling"].startswith("copy") and copy["unit"] == "GB/s", copy
    assert matmul["ceiling"].startswith("matmul") and matmul["unit"] == "TFLOP/s", matmul
    assert copy["value"] > 0 and matmul["value"] > 0 and copy["ms"] > 0, (copy, matmul)
    return copy["value"] * 1e9, matmul["value"] * 1e12


def flops(B: int, new: int, ctx: int) -> float:
    """FLOPs of a forward of `new` tokens per sequence over `ctx` cached ones (keys attended:
    ctx + 1 .. ctx + new), B sequences, logits of the last token only."""
    t = TINY_TEXT
    h, q, kv, L = t.hidden_size, t.num_attention_heads * t.head_dim, \
        t.num_key_value_heads * t.head_dim, t.num_hidden_layers
    per_token = L * (h * q + 2 * h * kv + q * h + 3 * h * t.intermediate_size)
    keys = sum(ctx + i for i in range(1, new + 1))
    return B * (2 * new * per_token + 4 * L * q * keys + 2 * h * t.vocab_size)


def bench_subparsers() -> dict[str, argparse.ArgumentParser]:
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = top.choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_and_flag_has_help(capsys):
    parsers = bench_subparsers()
    assert set(parsers) == set(SUBCOMMANDS)
    for name, parser in parsers.items():
        undocumented = [a.option_strings for a in parser._actions
                        if a.option_strings and not (a.help or "").strip()]
        assert not undocumented, f"bench {name}: flags without help: {undocumented}"
        assert main(["bench", name, "--help"]) == 0
        assert "--out" in capsys.readouterr().out or name == "suite"


def test_latency_tiny(tmp_path):
    assert main(["bench", "latency", "--tiny", "--out", str(tmp_path)]) == 0
    data = check_results(tmp_path, "bench latency --tiny")
    (row,) = rows_of(data, "Single request")
    assert (row["iters"], row["errors"], row["out_tokens"]) == (3, 0, 8), row
    monotone_percentiles(row, ("ttft", "e2e"))
    assert 0 < row["ttft_p50_ms"] < row["e2e_p50_ms"] and row["decode_tok_per_s_p50"] > 0, row
    assert data["record"]["model"].startswith("tiny random")
    per_step = step_bytes(TINY_TEXT, 1, 24 + 8 / 2, 4)   # at the mean context
    assert row["decode_gb_s"] == pytest.approx(per_step * row["decode_tok_per_s_p50"] / 1e9)
    bw, peak = ceilings(data)
    # decode at batch 1 against the bandwidth: weights + KV read per token / copy → max tok/s
    assert row["decode_ceiling_tok_s"] == pytest.approx(bw / per_step)
    assert row["pct_copy"] == pytest.approx(100 * row["decode_gb_s"] * 1e9 / bw)
    # TTFT against the larger of the prefill's compute and memory floors
    floor = max(flops(1, 24, 0) / peak, step_bytes(TINY_TEXT, 1, 24, 4) / bw)
    assert row["ttft_floor_ms"] == pytest.approx(1e3 * floor)
    assert row["pct_ttft_floor"] == pytest.approx(100 * 1e3 * floor / row["ttft_p50_ms"])
    report = (tmp_path / "report.md").read_text()
    assert f"## {CEILINGS}" in report and "pct_copy = decode tok/s" in report, report[-2000:]


def test_latency_beside_transformers(tmp_path, capsys):
    assert main(["bench", "latency", "--tiny", "--peers", "eager,compiled", "--iters", "2",
                 "--out", str(tmp_path)]) == 0
    data = check_results(tmp_path, "--peers eager,compiled")
    rows = {r["impl"]: r for r in rows_of(data, "Single request")}
    ours, eager = rows["fastllava"], rows["hf eager (DynamicCache)"]
    assert (eager["iters"], eager["errors"], eager["out_tokens"]) == (2, 0, 8), eager
    monotone_percentiles(eager, ("ttft", "e2e"))
    assert eager["fastllava_x_decode"] == pytest.approx(
        ours["decode_tok_per_s_p50"] / eager["decode_tok_per_s_p50"]), eager
    assert eager["fastllava_x_ttft"] == pytest.approx(eager["ttft_p50_ms"] / ours["ttft_p50_ms"])
    # the peer's figures against the same ceilings as fastllava's
    assert eager["pct_copy"] == pytest.approx(
        ours["pct_copy"] * eager["decode_tok_per_s_p50"] / ours["decode_tok_per_s_p50"])
    assert eager["ttft_floor_ms"] == ours["ttft_floor_ms"] and eager["pct_ttft_floor"] > 0
    compiled = rows["hf compiled (StaticCache, reduce-overhead)"]
    if not torch.cuda.is_available():
        assert compiled["note"].startswith("n/a: CUDA graphs") and compiled["iters"] is None
        assert compiled["pct_copy"] is None and compiled["ttft_floor_ms"] is None, compiled
    assert main(["bench", "latency", "--tiny", "--peers", "vllm"]) == 2
    assert "--peers" in capsys.readouterr().err


@pytest.mark.parametrize("copy_gb_s, matmul_tflop_s", [(1e3, 1e-6), (1e-3, 1e3)])
def test_throughput_floor_terms(copy_gb_s, matmul_tflop_s):
    """The roofline with each term forced to win: compute-bound (a slow matmul) and
    bandwidth-bound (a slow copy) prefill and decode, 5 prompts of 24 tokens, 6 out."""
    from fastllava.benchmarks.roofline import Ceilings, rate_throughput

    row = {"out_tok_per_s": 100.0}
    rate_throughput([row], TINY_TEXT, 4, 5, 24, 6, Ceilings(copy_gb_s, matmul_tflop_s, []))
    bw, peak = copy_gb_s * 1e9, matmul_tflop_s * 1e12
    if matmul_tflop_s < 1:
        floor = (5 * flops(1, 24, 0) + 5 * flops(5, 1, 26)) / peak
    else:
        floor = (step_bytes(TINY_TEXT, 5, 24, 4) + 5 * step_bytes(TINY_TEXT, 5, 27, 4)) / bw
    assert row["roofline_out_tok_s"] == pytest.approx(30 / floor, rel=1e-9)
    assert row["pct_roofline"] == pytest.approx(100 * 100.0 * floor / 30, rel=1e-9)


def test_throughput_beside_transformers(tmp_path, capsys):
    """fastllava and transformers' batched generate (batches of 2, the last one of 1) on the
    same 5 prompts: the same table, the ratio to fastllava and to the batch's roofline."""
    assert main(["bench", "throughput", "--tiny", "--num-prompts", "5", "--output-len", "6",
                 "--peers", "eager,compiled", "--peer-batch-size", "2",
                 "--out", str(tmp_path)]) == 0
    data = check_results(tmp_path, "bench throughput --tiny")
    rows = {r["impl"]: r for r in rows_of(data, "Offline batch")}
    ours, eager = rows["fastllava"], rows["hf eager (DynamicCache)"]
    assert (ours["max_batch"], eager["max_batch"]) == (5, 2)
    bw, peak = ceilings(data)
    # all 5 prompts at once: prefill, then 5 decode steps at the mean context 24 + 6/2 = 27,
    # each attending 27 keys (flops(B, 1, c) attends c + 1); which term of each max() wins
    # depends on the measured ceilings (test_throughput_floor_terms pins both)
    floor = (max(flops(5, 24, 0) / peak, step_bytes(TINY_TEXT, 5, 24, 4) / bw)
             + 5 * max(step_bytes(TINY_TEXT, 5, 27, 4) / bw, flops(5, 1, 26) / peak))
    for row in (ours, eager):
        # no stop ids: every request generates exactly --output-len tokens
        assert (row["requests"], row["ok"], row["errors"], row["out_tokens"]) == (5, 5, 0, 30), row
        assert row["req_per_s"] == pytest.approx(5 / row["wall_s"])
        assert row["total_tok_per_s"] == pytest.approx((30 + 5 * 24) / row["wall_s"]), row
        assert row["roofline_out_tok_s"] == pytest.approx(30 / floor)
        assert row["pct_roofline"] == pytest.approx(100 * row["out_tok_per_s"] * floor / 30)
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"], row
    assert eager["fastllava_x_tput"] == pytest.approx(ours["out_tok_per_s"] / eager["out_tok_per_s"])
    compiled = rows["hf compiled (StaticCache, reduce-overhead)"]
    if not torch.cuda.is_available():
        assert compiled["note"].startswith("n/a: CUDA graphs") and compiled["requests"] is None
        assert compiled["pct_roofline"] is None and compiled["fastllava_x_tput"] is None
    report = (tmp_path / "report.md").read_text()
    assert "| hf eager (DynamicCache) | 2 | 5 | 5 | 0 |" in report and "pct_roofline = " in report
    assert main(["bench", "throughput", "--tiny", "--peer-batch-size", "0"]) == 2
    assert "--peer-batch-size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_real_shapes_need_a_gpu(capsys):
    assert main(["bench", "latency", "--config", "llava-v1.6-34b"]) == 2
    err = capsys.readouterr().err
    assert "llava-v1.6-34b" in err and "--tiny" in err, err
    assert main(["bench", "throughput", "--config", "nope"]) == 2
    assert "known" in capsys.readouterr().err


def test_kernels_smoke_one_kernel(tmp_path):
    assert main(["bench", "kernels", "--smoke", "--only", "gelu", "--out", str(tmp_path)]) == 0
    rows = check_results(tmp_path, "bench kernels --smoke")["rows"]
    timed = [r for r in rows if r["table"] == "Kernels" and r["ms"]]
    assert {r["impl"] for r in timed} == {"triton", "torch ref"} and all(r["kernel"] == "gelu"
                                                                         for r in timed), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_kernels_real_shapes_say_gpu_needed(tmp_path, capfd):
    assert main(["bench", "kernels", "--out", str(tmp_path / "k")]) != 0
    assert "CUDA" in capfd.readouterr().err and not (tmp_path / "k").exists()


def test_suite_goes_on_past_a_failure(tmp_path, capsys):
    with socket.socket() as s:        # a port nobody listens on: the serve step fails
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    code = main(["bench", "suite", "--smoke", "--kernel", "gelu", "--base-url", dead,
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "3 step(s) passed; failed: serve" in out, out[-2000:]
    for step in ("latency", "throughput", "kernels"):
        check_results(tmp_path / step, f"bench {step}")


def test_suite_forwards_peers_to_latency_and_throughput_only():
    from fastllava.benchmarks.cli import suite_steps
    from fastllava.cli import build_parser

    args = build_parser().parse_args(["bench", "suite", "--smoke", "--peers", "eager"])
    steps = dict(suite_steps(args))
    for name in ("latency", "throughput"):
        assert steps[name][-2:] == ["--peers", "eager"], steps[name]
    assert "--peers" not in steps["kernels"]
    default = dict(suite_steps(build_parser().parse_args(["bench", "suite", "--smoke"])))
    assert not any("--peers" in argv for argv in default.values())


def test_pytest_benchmark_components_smoke(tmp_path):
    """CI smoke of `pytest bench/ --benchmark-only` (tiny shapes on the CPU): the component
    benchmarks run and land in pytest-benchmark's JSON with their timings."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "bench/test_components.py", "-k", "preprocess or decode_step",
                           "--benchmark-only", f"--benchmark-json={out}"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = {b["name"]: b["stats"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(names) == {"test_preprocess[1024x768]", "test_preprocess[4000x3000]",
                          "test_decode_step[1]", "test_decode_step[8]"}, sorted(names)
    assert all(s["rounds"] >= 1 and s["median"] > 0 for s in names.values()), names


def test_latency_and_throughput_on_a_checkpoint(tiny_llava, tmp_path):
    """--model: through the public API (image included), so the numbers come from the checkpoint."""
    common = ["--model", str(tiny_llava), "--device", "cpu", "--dtype", "float32",
              "--output-len", "4"]
    assert main(["bench", "latency", *common, "--iters", "2", "--warmup", "1",
                 "--out", str(tmp_path / "lat")]) == 0
    data = check_results(tmp_path / "lat", "bench latency --model")
    (row,) = rows_of(data, "Single request")
    assert all(c["note"].startswith("not measured: --model") for c in rows_of(data, CEILINGS))
    assert data["record"]["model"] == str(tiny_llava)
    assert (row["iters"], row["errors"]) == (2, 0) and 1 <= row["out_tokens"] <= 4, row
    assert 0 < row["ttft_p50_ms"] <= row["e2e_p50_ms"], row
    assert main(["bench", "throughput", *common, "--num-prompts", "3",
                 "--out", str(tmp_path / "thr")]) == 0
    (row,) = rows_of(check_results(tmp_path / "thr", "bench throughput --model"), "Offline batch")
    assert (row["ok"], row["errors"]) == (3, 0) and 3 <= row["out_tokens"] <= 12, row


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_fp8_kv_rows_beside_the_model_dtype(tmp_path, mode):
    """--kv-cache-dtype fp8: one results table holding the model-dtype row and the fp8-KV row,
    the same prompts through each; latency counts the fp8 row's KV bytes at one byte."""
    extra = ["--iters", "2"] if mode == "latency" else ["--num-prompts", "3"]
    assert main(["bench", mode, "--tiny", "--kv-cache-dtype", "fp8", *extra,
                 "--out", str(tmp_path)]) == 0
    data = check_results(tmp_path, "--kv-cache-dtype fp8")
    assert data["record"]["kv_cache_dtype"] == "auto and fp8"
    rows = {r["impl"]: r for r in rows_of(data, "Single request" if mode == "latency"
                                          else "Offline batch")}
    assert set(rows) == {"fastllava", "fastllava (fp8 KV)"}, rows
    for row in rows.values():
        assert row["errors"] == 0 and row["out_tokens"] == (8 if mode == "latency" else 24), row
        assert row["tp"] == 1, row
    if mode == "latency":
        t = llava_config(TINY_CONFIG).text
        fp8 = rows["fastllava (fp8 KV)"]
        per_step = step_bytes(t, 1, 24 + 8 / 2, 4, None, 1)
        assert fp8["decode_gb_s"] == pytest.approx(per_step * fp8["decode_tok_per_s_p50"] / 1e9)
        assert fp8["decode_ceiling_tok_s"] == pytest.approx(ceilings(data)[0] / per_step)
        assert per_step < step_bytes(t, 1, 24 + 8 / 2, 4)


def test_an_fp8_kv_row_is_rated_with_one_byte_kv():
    """The roofline of a "fastllava (fp8 KV)" row counts its KV reads at 1 byte per element:
    a higher decode ceiling and throughput roofline than the same row over model-dtype pages."""
    from fastllava.benchmarks import roofline

    t = llava_config(TINY_CONFIG).text
    ceil = roofline.Ceilings(100.0, 50.0, [])
    lat = [{"decode_tok_per_s_p50": 10.0, "ttft_p50_ms": 5.0},
           {"kv_cache_dtype": "fp8", "decode_tok_per_s_p50": 10.0, "ttft_p50_ms": 5.0}]
    roofline.rate_latency(lat, t, 4, 24, 8, ceil)
    assert lat[1]["decode_ceiling_tok_s"] == pytest.approx(
        100e9 / step_bytes(t, 1, 24 + 8 / 2, 4, None, 1))
    assert lat[1]["decode_ceiling_tok_s"] > lat[0]["decode_ceiling_tok_s"]
    tput = [{"out_tok_per_s": 10.0}, {"kv_cache_dtype": "fp8", "out_tok_per_s": 10.0}]
    roofline.rate_throughput(tput, t, 4, 8, 24, 8, ceil)
    assert tput[1]["roofline_out_tok_s"] > tput[0]["roofline_out_tok_s"]


def test_a_tensor_parallel_row_is_rated_against_n_devices():
    """TP rows: N GPUs read and multiply in parallel, so their ceilings are N x one device's."""
    from fastllava.benchmarks import roofline
    from fastllava.weights.random import TINY_CONFIG, llava_config

    t = llava_config(TINY_CONFIG).text
    ceil = roofline.Ceilings(100.0, 50.0, [])
    lat = [{"tp": 1, "decode_tok_per_s_p50": 10.0, "ttft_p50_ms": 5.0},
           {"tp": 2, "decode_tok_per_s_p50": 10.0, "ttft_p50_ms": 5.0}]
    roofline.rate_latency(lat, t, 4, 24, 8, ceil)
    assert lat[1]["decode_ceiling_tok_s"] == pytest.approx(2 * lat[0]["decode_ceiling_tok_s"])
    assert lat[1]["ttft_floor_ms"] == pytest.approx(lat[0]["ttft_floor_ms"] / 2)
    tput = [{"tp": 1, "out_tok_per_s": 10.0}, {"tp": 2, "out_tok_per_s": 10.0}]
    roofline.rate_throughput(tput, t, 4, 8, 24, 8, ceil)
    assert tput[1]["roofline_out_tok_s"] == pytest.approx(2 * tput[0]["roofline_out_tok_s"])
