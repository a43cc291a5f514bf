"""Every Triton kernel builds for Hopper (sm_90a) and fits it: no GPU needed.

tests/kernels/hopper_build.py compiles each launcher at the real model shapes through Triton's
own compile path, for an H100/H200 target, and asks ptxas for registers and spills. Numerics on
the GPU are the `gpu` tests' job; speed is bench/kernels.py's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent.parent / "kernels"
SHARED_LIMIT = 227 * 1024          # max shared memory per block on H100/H200
REGISTERS_PER_SM = 64 * 1024


@pytest.fixture(scope="module")
def built() -> list[dict]:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(HERE / "hopper_build.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_is_built(built):
    defined = set()
    for path in KERNELS.glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s+def (_\w+_kernel)\(",
                                      path.read_text()))
    assert defined, "found no kernels"
    assert {b["kernel"] for b in built} == defined


def test_kernels_fit_an_sm_and_do_not_spill(built):
    for b in built:
        where = f"{b['case']}: {b['kernel']} {b}"
        assert b["shared_bytes"] <= SHARED_LIMIT, where
        assert b["registers"] * 32 * b["num_warps"] <= REGISTERS_PER_SM, where
        assert b["spill_bytes"] == 0, where


def test_fp8_kv_variants_are_built(built):
    """Every kernel that reads or writes KV pages also builds over float8_e4m3fn pages."""
    fp8 = {b["kernel"] for b in built if b["case"].endswith("fp8 KV")}
    assert fp8 == {"_decode_split_kernel", "_decode_merge_kernel", "_prefill_attention_kernel",
                   "_write_kv_kernel", "_rotary_write_kv_kernel"}
