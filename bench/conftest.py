"""pytest-benchmark fixtures for the component benchmarks (bench/test_components.py).

    pytest bench/ --benchmark-only                        # real 13B shapes on a GPU, tiny on a CPU
    pytest bench/ --benchmark-only --benchmark-autosave   # saved under .benchmarks/ per commit
    pytest bench/ --benchmark-only --benchmark-compare    # ... against the last saved run
    pytest bench/ --benchmark-only --bench-config llava-v1.6-34b

Timing: on CUDA every round ends with a CUDA-event record + synchronize, so pytest-benchmark's
wall-clock stats include the GPU work, and the CUDA-event median (GPU time alone, no host launch
gaps at the edges) goes in `extra_info["cuda_event_median_ms"]`; on a CPU, plain wall time.
Not part of the default test run (testpaths = tests); CI runs one of them in smoke mode
(tests/test_bench_cli.py).
"""

from __future__ import annotations

import statistics

import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("fastllava bench")
    g.addoption("--bench-config", default="llava-1.5-13b",
                help="random weights at this checkpoint's shapes on a GPU (default llava-1.5-13b)")
    g.addoption("--bench-tiny", action="store_true",
                help="tiny random model and shapes even on a GPU (always so on a CPU)")


@pytest.fixture(scope="session")
def tiny(request) -> bool:
    return request.config.getoption("--bench-tiny") or not torch.cuda.is_available()


@pytest.fixture(scope="session")
def device(tiny) -> str:
    return "cuda" if torch.cuda.is_available() and not tiny else "cpu"


@pytest.fixture
def measure(benchmark, device):
    """measure(fn, rounds=None): benchmark fn (CUDA-event timed on a GPU, see the docstring)."""
    def run(fn, rounds: int | None = None):
        rounds = rounds or (20 if device == "cuda" else 3)
        if device != "cuda":
            return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        times: list[float] = []

        def timed():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            return out
        out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
        if len(times) > 2:
            benchmark.extra_info["cuda_event_median_ms"] = statistics.median(times[2:])
        return out
    return run
