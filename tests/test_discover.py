"""Checkpoint discovery: local folders, hub ids through the HF cache, and offline errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from fastllava.weights import CheckpointNotFoundError, list_safetensors, resolve_model_path
def test_resolve_local_folders(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path(tmp_path) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    assert resolve_model_path("~/ckpt") == tmp_path / "ckpt"
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./ckpt") == pathlib.Path("ckpt")
    (tmp_path / "file.json").write_text("{}")
    for bad, why in [("./missing", "does not exist"), ("~/missing", "does not exist"),
                     (str(tmp_path / "missing"), "does not exist"), ("a/b/c", "does not exist"),
                     ("file.json", "is a file")]:
        with pytest.raises(CheckpointNotFoundError, match=why) as info:
            resolve_model_path(bad)
        assert repr(bad) in str(info.value)


def test_hub_id_offline_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported
    with pytest.raises(CheckpointNotFoundError, match=r"hub repo 'fastllava-test/no-such-model'.*"
                                                      r"HF_HUB_OFFLINE") as info:
        resolve_model_path("fastllava-test/no-such-model")
    assert info.value.__context__ is None and info.value.__cause__ is None


_HUB_SCRIPT = textwrap.dedent("""
    import json, time
    from fastllava.weights import CheckpointNotFoundError, list_safetensors, resolve_model_path
    out = {}
    for repo in ("fastllava-test/cached", "fastllava-test/absent"):
        start = time.perf_counter()
        try:
            out[repo] = {"path": str(resolve_model_path(repo))}
        except CheckpointNotFoundError as exc:
            out[repo] = {"error": str(exc), "chained": exc.__context__ is not None}
        out[repo]["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
""")


def test_hub_id_from_cache_and_offline_miss_in_fresh_process(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE as a user sets them: before the process starts."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--fastllava-test--cached"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    save_file({"lm_head.weight": torch.zeros(2, 2)}, snapshot / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fastllava-test/cached"]["path"] == str(snapshot), out
    assert list_safetensors(out["fastllava-test/cached"]["path"]) == {
        "lm_head.weight": snapshot / "model.safetensors"}
    absent = out["fastllava-test/absent"]
    assert "fastllava-test/absent" in absent["error"] and "HF_HUB_OFFLINE" in absent["error"], out
    assert not absent["chained"] and absent["seconds"] < 5, out
