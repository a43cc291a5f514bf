"""The one error for a checkpoint that is missing or damaged, and readers that raise it.

Downloads get interrupted and disks fill up. Every loader of a checkpoint's small files
(config.json, generation_config.json, tokenizer and processor configs, chat templates, the
safetensors index) reads them through `read_json` / `read_text`, so a file that is cut short,
overwritten or not UTF-8 fails with one line naming the file, what is wrong (JSON syntax error at
line:col, ...) and the remedy, never a parser's traceback. Safetensors shards are checked in
fastllava.weights.shards with the same error.

Torch-free: the tokenizer and template modules use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REDOWNLOAD = "re-download this file"


class CheckpointError(ValueError):
    """A checkpoint folder, hub repo or one of its files cannot be found or fetched, or a file
    in it is damaged (truncated, overwritten, unparsable) or stores what fastllava cannot load."""


# The earlier name, from when only missing files were reported; the same class.
CheckpointNotFoundError = CheckpointError


def damaged(path: str | os.PathLike, problem: str, remedy: str = REDOWNLOAD) -> CheckpointError:
    """The error for checkpoint file `path`: "<path>: <problem>; <remedy>"."""
    return CheckpointError(f"damaged checkpoint file {os.fspath(path)}: {problem}; {remedy}")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file of the checkpoint (OSError, e.g. permissions, is left to the caller)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
                      ) from None


def read_json(path: str | os.PathLike) -> dict:
    """A checkpoint JSON file that must hold an object; FileNotFoundError if it is absent."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = "the file is empty" if not text.strip() else \
            f"JSON syntax error at line {e.lineno}:{e.colno} ({e.msg})"
        raise damaged(path, problem) from None
    if not isinstance(value, dict):
        raise damaged(path, f"expected a JSON object, found a JSON {type(value).__name__}")
    return value


def read_json_if_present(path: str | os.PathLike) -> dict:
    """`read_json`, or {} when the (optional) file is absent."""
    return read_json(path) if Path(path).is_file() else {}
