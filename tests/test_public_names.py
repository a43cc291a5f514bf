"""The top-level public names: importable from `fastllava`, the very objects of their home modules,
listed in the README's "Public names" table with the right module; the README's verify_signature
example runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import fastllava

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ERRORS = ["RequestValidationError", "ImageError", "ImageFetchError", "ImageDecodeError",
          "ImageTooLargeError", "CheckpointError", "CheckpointNotFoundError", "ConfigError",
          "WeightLoadError"]
# Importing these must not import torch (the CLI and torch-free callers catch them).
TORCH_FREE = ["RuntimeConfig", "ImageLimits", "RequestValidationError", "ImageError",
              "ImageFetchError", "ImageDecodeError", "ImageTooLargeError", "ConfigError",
              "CheckpointError"]


def _readme_table() -> dict[str, str]:
    section = README.split("### Public names", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|", section, re.M))


def test_each_public_name_is_its_home_modules_object():
    for name in fastllava.__all__:
        home = importlib.import_module(fastllava._PUBLIC[name])
        assert getattr(fastllava, name) is getattr(home, name), name
    for name in ("LLaVA", "ImageLimits", "RuntimeConfig", *ERRORS):
        assert name in fastllava.__all__ and name in dir(fastllava), name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fastllava.Nope  # noqa: B018


def test_error_classes_are_value_errors():
    for name in ERRORS:
        assert issubclass(getattr(fastllava, name), ValueError), name
    for name in ("ImageFetchError", "ImageDecodeError", "ImageTooLargeError"):
        assert issubclass(getattr(fastllava, name), fastllava.ImageError), name


def test_readme_table_lists_every_public_name_where_it_lives():
    assert _readme_table() == fastllava._PUBLIC


def test_config_and_error_names_import_without_torch():
    code = (f"import sys; from fastllava import {', '.join(TORCH_FREE)}; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_missing_checkpoint_is_caught_by_its_public_class(tmp_path):
    with pytest.raises(fastllava.CheckpointError):
        fastllava.LLaVA.from_pretrained(str(tmp_path / "no-such-checkpoint"), device="cpu")


def test_readme_verify_signature_example_runs():
    """The README's Webhooks example, executed with a request signed by the server's `sign`:
    authentic → ok; another secret, a changed byte, a stale timestamp or no header → not ok."""
    pytest.importorskip("httpx")   # fastllava.server.webhooks needs the server extra
    from fastllava.server.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    webhooks = README.split("### Webhooks", 1)[1]
    example = re.search(r"```python\n(.*?)```", webhooks, re.S).group(1)
    assert "verify_signature(" in example

    def ok(body: bytes, secret="S", age_s=0.0, signed=None, drop_header=False) -> bool:
        ts = int(time.time() - age_s)
        headers = {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(secret, ts, signed or body)}
        if drop_header:
            del headers[SIGNATURE_HEADER]
        scope = {"request": types.SimpleNamespace(headers=headers), "raw_body": body}
        exec(example, scope)  # noqa: S102 - the README's own code
        return scope["ok"]

    body = b'{"request_id": "r1", "status": "OK", "payload": {"output": "a cat"}}'
    assert ok(body)
    assert not ok(body, secret="T")
    assert not ok(body, signed=body.replace(b"cat", b"dog"))
    assert not ok(body, age_s=301)
    assert not ok(body, drop_header=True)
