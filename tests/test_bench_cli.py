"""`fastllava bench latency | throughput | kernels | suite` in their CPU smoke modes: each writes
report.md / results.csv / results.json with the run record and real PNG figures; every flag has
help; the real-shape runs refuse a machine without a GPU with a clear message."""

from __future__ import annotations

import argparse
import socket

import pytest
import torch

from benchkit import check_results, monotone_percentiles
from fastllava.cli import build_parser, main

SUBCOMMANDS = ("latency", "throughput", "serve", "kernels", "suite")


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
    (row,) = data["rows"]
    assert (row["iters"], row["errors"], row["out_tokens"]) == (3, 0, 8), row
    monotone_percentiles(row, ("ttft", "e2e"))
    assert 0 < row["ttft_p50_ms"] < row["e2e_p50_ms"] and row["decode_tok_per_s_p50"] > 0, row
    assert data["record"]["model"].startswith("tiny random")
    from fastllava.benchmarks.common import step_bytes
    from fastllava.weights.random import TINY_CONFIG, llava_config
    per_step = step_bytes(llava_config(TINY_CONFIG).text, 1, 24 + 8 / 2, 4)   # fp32 on the CPU
    assert row["decode_gb_s"] == pytest.approx(per_step * row["decode_tok_per_s_p50"] / 1e9)
    assert row["pct_copy"] is None or torch.cuda.is_available(), "no ceiling is measured on a CPU"


def test_latency_beside_transformers(tmp_path, capsys):
    assert main(["bench", "latency", "--tiny", "--peers", "eager,compiled", "--iters", "2",
                 "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in check_results(tmp_path, "--peers eager,compiled")["rows"]}
    ours, eager = rows["fastllava"], rows["hf eager (DynamicCache)"]
    assert (eager["iters"], eager["errors"], eager["out_tokens"]) == (2, 0, 8), eager
    monotone_percentiles(eager, ("ttft", "e2e"))
    assert eager["fastllava_x_decode"] == pytest.approx(
        ours["decode_tok_per_s_p50"] / eager["decode_tok_per_s_p50"]), eager
    assert eager["fastllava_x_ttft"] == pytest.approx(eager["ttft_p50_ms"] / ours["ttft_p50_ms"])
    compiled = rows["hf compiled (StaticCache, reduce-overhead)"]
    if not torch.cuda.is_available():
        assert compiled["note"].startswith("n/a: CUDA graphs") and compiled["iters"] is None
    assert main(["bench", "latency", "--tiny", "--peers", "vllm"]) == 2
    assert "--peers" in capsys.readouterr().err


def test_throughput_tiny(tmp_path):
    assert main(["bench", "throughput", "--tiny", "--num-prompts", "5", "--output-len", "6",
                 "--out", str(tmp_path)]) == 0
    (row,) = check_results(tmp_path, "bench throughput --tiny")["rows"]
    # no stop ids: every request generates exactly --output-len tokens
    assert (row["requests"], row["ok"], row["errors"], row["out_tokens"]) == (5, 5, 0, 30), row
    assert row["req_per_s"] == pytest.approx(5 / row["wall_s"])
    assert row["total_tok_per_s"] == pytest.approx((30 + 5 * 24) / row["wall_s"]), row


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
    (row,) = data["rows"]
    assert data["record"]["model"] == str(tiny_llava)
    assert (row["iters"], row["errors"]) == (2, 0) and 1 <= row["out_tokens"] <= 4, row
    assert 0 < row["ttft_p50_ms"] <= row["e2e_p50_ms"], row
    assert main(["bench", "throughput", *common, "--num-prompts", "3",
                 "--out", str(tmp_path / "thr")]) == 0
    (row,) = check_results(tmp_path / "thr", "bench throughput --model")["rows"]
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
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"fastllava", "fastllava (fp8 KV)"}, rows
    for row in rows.values():
        assert row["errors"] == 0 and row["out_tokens"] == (8 if mode == "latency" else 24), row
    if mode == "latency":
        from fastllava.benchmarks.common import step_bytes
        from fastllava.weights.random import TINY_CONFIG, llava_config
        t = llava_config(TINY_CONFIG).text
        fp8 = rows["fastllava (fp8 KV)"]
        per_step = step_bytes(t, 1, 24 + 8 / 2, 4, None, 1)
        assert fp8["decode_gb_s"] == pytest.approx(per_step * fp8["decode_tok_per_s_p50"] / 1e9)
        assert per_step < step_bytes(t, 1, 24 + 8 / 2, 4)
