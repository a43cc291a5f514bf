"""A damaged checkpoint is one clear error naming the file, never a traceback (issue 18).

Each case damages a copy of the tiny sharded checkpoint the way an interrupted download, a full
disk or a bad copy does, then loads it: `LLaVA.from_pretrained` raises CheckpointError naming the
file, what is wrong and the remedy, before any tensor is read; `fastllava run` and
`fastllava serve` (real processes) print that one line and exit 2, serve before it listens.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastllava import CheckpointError
from fastllava.api import LLaVA
from fastllava.weights import loader


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def _garbage(path: Path, seed: int = 0) -> str:
    path.write_bytes(random.Random(seed).randbytes(path.stat().st_size))
    return path.name


def _truncate(path: Path, size: int) -> str:
    path.write_bytes(path.read_bytes()[:size])
    return path.name


def _header_longer_than_file(folder: Path) -> str:
    shard = _first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[:8] = len(data).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    return shard.name


def _index_names_absent_tensor(folder: Path) -> str:
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name, shard = next(iter(d["weight_map"].items()))
    d["weight_map"][name] = next(f for f in sorted(set(d["weight_map"].values())) if f != shard)
    index.write_text(json.dumps(d))
    return index.name


def _cut_text(name: str):
    """The file cut in half: an interrupted download of a text file."""
    def damage(folder: Path) -> str:
        return _truncate(folder / name, (folder / name).stat().st_size // 2)
    return damage


def _missing_comma(name: str):
    def damage(folder: Path) -> str:
        path = folder / name
        path.write_text(path.read_text().replace(",", "", 1))
        return name
    return damage


def _written(name: str, text: str):
    """An optional file the checkpoint did not ship, present but damaged."""
    def damage(folder: Path) -> str:
        (folder / name).write_text(text)
        return name
    return damage


def _cut_preprocessor_config(folder: Path) -> str:
    """The flat preprocessor_config.json form (no processor_config.json), cut in half."""
    nested = folder / "processor_config.json"
    text = json.dumps(json.loads(nested.read_text())["image_processor"], indent=2)
    nested.unlink()
    (folder / "preprocessor_config.json").write_text(text[:len(text) // 2])
    return "preprocessor_config.json"


def _retyped_tensor(dtype: torch.dtype):
    """The first shard rewritten with one tensor in `dtype`, headers otherwise consistent."""
    def damage(folder: Path) -> str:
        shard = _first_shard(folder)
        tensors = load_file(shard)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].to(dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
        return shard.name
    return damage


_SHARD_CUT = r"cut short inside the tensor data"
_JSON = r"JSON syntax error at line \d+:\d+"
# case → (damage(folder) -> damaged file's name, what the message must say, also through the CLI)
CASES = {
    "shard_garbage": (lambda f: _garbage(_first_shard(f)), r"unreadable header", True),
    "shard_half": (lambda f: _truncate(_first_shard(f), _first_shard(f).stat().st_size // 2),
                   _SHARD_CUT, True),
    "shard_cut_in_tensor_data": (
        lambda f: _truncate(_first_shard(f), _first_shard(f).stat().st_size - 1), _SHARD_CUT, True),
    "shard_header_longer_than_file": (_header_longer_than_file, r"unreadable header: it claims",
                                      True),
    "index_names_absent_tensor": (_index_names_absent_tensor, r"which does not hold it", True),
    "index_json": (_cut_text("model.safetensors.index.json"), _JSON, True),
    "config_json": (_missing_comma("config.json"), _JSON, True),
    "generation_config_json": (_cut_text("generation_config.json"), _JSON, True),
    "preprocessor_config_json": (_cut_preprocessor_config, _JSON, True),
    "tokenizer_config_json": (_missing_comma("tokenizer_config.json"), _JSON, True),
    "tokenizer_json": (_cut_text("tokenizer.json"), _JSON, True),
    "tokenizer_model_garbage": (lambda f: _garbage(f / "tokenizer.model", 1),
                                r"sentencepiece cannot parse it|cut short", True),
    "float8_tensor": (_retyped_tensor(torch.float8_e4m3fn), r"has dtype F8_E4M3, which fastllava "
                      r"cannot load", True),
    # The same code path through the CLI as the cases above: checked through the API only.
    "int_tensor_as_weight": (_retyped_tensor(torch.int32), r"has dtype I32, which fastllava "
                             r"cannot load", False),
    "shard_cut_inside_header": (lambda f: _truncate(_first_shard(f), 100), r"unreadable header",
                                False),
    "processor_config_json": (_cut_text("processor_config.json"), _JSON, False),
    "special_tokens_map_json": (_written("special_tokens_map.json", '{"bos_token": '),
                                r"JSON syntax error at line 1:15", False),
    "config_not_utf8": (lambda f: _garbage(f / "config.json", 2), r"not UTF-8 text", False),
    "chat_template_cut": (_cut_text("chat_template.jinja"), r"chat template syntax error", False),
    "tokenizer_model_cut": (_cut_text("tokenizer.model"), r"cut short|sentencepiece", False),
}


def _damaged_copy(case: str, source: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(damaged checkpoint folder, the damaged file, the pattern its message must match)."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    damage, pattern, _ = CASES[case]
    return folder, folder / damage(folder), pattern


def _assert_names_file_problem_remedy(message: str, file: Path, pattern: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    assert str(file) in message, (file, message)
    assert re.search(pattern, message), (pattern, message)
    assert "re-download" in message, message


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_raises_checkpoint_error(case, tiny_next, tmp_path, monkeypatch):
    folder, file, pattern = _damaged_copy(case, tiny_next, tmp_path)

    def no_tensor_read(*args, **kwargs):
        raise AssertionError("a tensor was read before the damage was found")

    monkeypatch.setattr(loader, "safe_open", no_tensor_read)
    with pytest.raises(CheckpointError) as info:
        LLaVA.from_pretrained(folder, device="cpu", dtype="float32")
    assert isinstance(info.value, ValueError)
    _assert_names_file_problem_remedy(str(info.value), file, pattern)


@pytest.mark.parametrize("case", [c for c, (_, _, cli) in CASES.items() if cli])
def test_cli_run_and_serve_print_one_line_and_exit_2(case, tiny_next, tmp_path):
    from PIL import Image

    folder, file, pattern = _damaged_copy(case, tiny_next, tmp_path)
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(image)
    cli = [sys.executable, "-m", "fastllava"]
    commands = {
        "run": [*cli, "run", "--model", str(folder), "--image", str(image), "--prompt", "hi",
                "--device", "cpu"],
        # port 0: were the damage missed, serve would bind a free port rather than clash.
        "serve": [*cli, "serve", "--model", str(folder), "--device", "cpu", "--port", "0",
                  "--data-dir", str(tmp_path / "data")],
    }
    # Both at once: each is mostly the torch import, and the machine has two cores.
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            lines = err.splitlines()
            assert proc.returncode == 2, (name, proc.returncode, err)
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
            assert out == "", (name, out)
            _assert_names_file_problem_remedy(lines[0], file, pattern)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_single_file_and_unindexed_shards_are_checked_too(tmp_path):
    from fastllava.weights import list_safetensors

    for name in ("model.safetensors", "part-1.safetensors"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        save_file({"a": torch.ones(4, 4), "b": torch.ones(8)}, folder / name)
        _truncate(folder / name, (folder / name).stat().st_size - 4)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / name))}: .*"
                                                  rf"{_SHARD_CUT}.*re-download this file"):
            list_safetensors(folder)
