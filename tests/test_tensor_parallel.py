"""tensor_parallel_size=2 on CPU (gloo): the same greedy tokens as TP=1 and transformers, logits
within LOGITS_ATOL; uneven head counts refused; a killed worker fails requests (never a hang) and
the engine refuses new ones; close, or the API process dying, leaves no process behind.
Loading: each rank reads only its slices (tests/test_tp_loading.py); the server:
tests/server/test_tensor_parallel_serve.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastllava import LLaVA
from fastllava.config import TextConfig
from fastllava.models.parallel import TensorParallelError, check_divisible
from fastllava.runtime.tp_driver import WorkerDiedError
from test_parity import NEW_TOKENS, _image, _ours, _reference
from tolerances import LOGITS_ATOL


def _load(path, tp: int = 2) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", tensor_parallel_size=tp)


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava"])
def test_tp2_matches_tp1_and_transformers(request, tmp_path, fixture):
    """NeXT (GQA 4/2, sharded files) and 1.5 (MHA 4/4, one file): greedy tokens identical to
    TP=1 and to transformers; logits within LOGITS_ATOL of transformers. The row-parallel
    all-reduces sum fp32 partial products in another order than one GEMM, so TP=2 logits are
    not bit-identical to TP=1 (the measured max difference is in the assertion message)."""
    path = request.getfixturevalue(fixture)
    img = _image(tmp_path / "img.png", 75, 100)
    _, ref_logits, ref_new, _ = _reference(path, img)
    one = LLaVA.from_pretrained(path, device="cpu", dtype="float32")
    try:
        new1, logits1, text1 = _ours(one, img)
    finally:
        one.close()
    two = _load(path)
    try:
        new2, logits2, text2 = _ours(two, img)
        pids = two._tp.pids
    finally:
        two.close()
    assert len(new2) >= NEW_TOKENS or new2[-1] in two.stop_ids
    assert new2 == new1 == ref_new, f"greedy tokens differ:\n tp2 {new2}\n tp1 {new1}\n ref {ref_new}"
    assert text2 == text1
    vs_ref = (logits2 - ref_logits).abs().max().item()
    vs_tp1 = (logits2 - logits1).abs().max().item()
    assert vs_ref <= LOGITS_ATOL, f"max |tp2 - transformers| = {vs_ref:.3g} > {LOGITS_ATOL}"
    assert vs_tp1 <= LOGITS_ATOL, f"max |tp2 - tp1| = {vs_tp1:.3g} > {LOGITS_ATOL}"
    assert all(_gone(pid) for pid in pids), "a worker outlived close()"
    with pytest.raises(RuntimeError):
        two.generate({"image_url": img, "prompt": "hi"})


def test_uneven_heads_refused(tiny_chatml_next, tiny_next, tmp_path):
    """num_key_value_heads 1 over 2 ranks (API), num_attention_heads 4 over 3 (`fastllava run`):
    refused with one error naming the counts (the CLI: one line, exit 2, no worker traceback)."""
    with pytest.raises(TensorParallelError, match=r"num_key_value_heads \(1\)"):
        _load(tiny_chatml_next, 2)
    proc = subprocess.run([sys.executable, "-m", "fastllava", "run", "--model", str(tiny_next),
                           "--image", _image(tmp_path / "i.png", 40, 40), "--prompt", "hi",
                           "--device", "cpu", "--tensor-parallel-size", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: tensor_parallel_size 3 does not divide the model's "
                                  "num_attention_heads (4)") and proc.stderr.count("\n") == 1, \
        proc.stderr


def test_fp8_refused(tiny_next):
    with pytest.raises(TensorParallelError, match="fp8"):
        LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32", quantization="fp8",
                              tensor_parallel_size=2)


def test_killed_worker_fails_requests_and_refuses_new(tiny_next, tmp_path):
    img = _image(tmp_path / "img.png", 75, 100)
    llava = _load(tiny_next)
    try:
        (pid,) = llava._tp.pids
        long = {"image_url": img, "prompt": "describe", "max_tokens": 200, "temperature": 0}
        stream = llava.stream(long)
        next(stream)                            # in flight: prefilled, decoding
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 30, "the failure took a collective timeout, not a check"
        with pytest.raises(WorkerDiedError, match="refuses new requests"):
            llava.generate({"image_url": img, "prompt": "hi", "max_tokens": 2})
    finally:
        llava.close()
    assert _gone(pid)


def test_intermediate_size_must_divide_too():
    text = TextConfig("llama", 448, 32, 64, 2, 6, 6, 8, 256, 1e-5, 1e4)
    check_divisible(text, 2)
    with pytest.raises(TensorParallelError, match=r"intermediate_size \(64\)"):
        check_divisible(text, 3)


def test_killed_api_process_leaves_no_worker(tiny_next):
    """The API process dies without close() (SIGKILL): its workers notice and exit."""
    script = ("import sys; from fastllava import LLaVA; "
              f"m = LLaVA.from_pretrained({str(tiny_next)!r}, device='cpu', dtype='float32', "
              "tensor_parallel_size=2); print(m._tp.pids[0], flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert not _gone(pid, 0)
    finally:
        proc.kill()
        proc.wait(10)
    assert _gone(pid), "a worker outlived its killed API process"


def test_bench_decode_tensor_parallel_smoke():
    """bench/decode.py --tensor-parallel-size 2 --kv-cache-dtype fp8 (tiny, CPU): timed engine
    rows (serial and overlapped loops) for every batch size over model-dtype and over fp8 KV
    pages (each its own TP runtime), the run header records the size, the replay rows say why
    there are none."""
    from benchkit import describe, table_rows
    from test_bench_decode import COLUMNS, IMPLS, SMOKE_BATCHES, run_bench

    proc = run_bench("--smoke", "--tensor-parallel-size", "2", "--kv-cache-dtype", "fp8",
                     "--peers", "none")
    assert proc.returncode == 0, describe(proc)
    rows = table_rows(proc.stdout, COLUMNS, 3, (*IMPLS, *(i + " (fp8 KV)" for i in IMPLS)))
    for suffix in ("", " (fp8 KV)"):
        for impl in ("fastllava engine", "fastllava overlapped loop"):
            engine = {r[1]: r for r in rows if r[3] == impl + suffix}
            assert sorted(engine) == sorted(SMOKE_BATCHES), describe(proc)
            assert all(float(r[5]) > 0 and r[-1] == "-" for r in engine.values()), describe(proc)
        replay = [r for r in rows if r[3] == "fastllava graph replay" + suffix]
        assert replay and all("tensor parallelism" in r[-1] for r in replay), describe(proc)
    assert "tensor_parallel_size" in proc.stdout and "2 (fastllava rows)" in proc.stdout


def test_hung_worker_times_out(tiny_next, tmp_path, monkeypatch):
    """A worker that stops answering (SIGSTOP) fails the step after the collective timeout
    instead of hanging it; the engine then refuses new requests."""
    from fastllava.runtime import tp_driver

    monkeypatch.setattr(tp_driver, "STEP_TIMEOUT_S", 3.0)
    img = _image(tmp_path / "img.png", 40, 40)
    llava = _load(tiny_next)
    (pid,) = llava._tp.pids
    try:
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="step failed"):
            llava.generate({"image_url": img, "prompt": "hi", "max_tokens": 4})
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerDiedError, match="refuses new requests"):
            llava.generate({"image_url": img, "prompt": "hi", "max_tokens": 4})
    finally:
        llava.close()
    assert _gone(pid), "the stopped worker outlived close()"
