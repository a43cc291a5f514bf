"""Find a checkpoint: a local folder or a Hugging Face hub id, and the safetensors files in it.

Only safetensors are read (streamable, no pickle); `.bin` / `.pt` checkpoints are refused with a
clear error rather than downloaded.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

from fastllava.checkpoint_files import CheckpointNotFoundError  # noqa: F401 (re-exported)
from fastllava.checkpoint_files import CheckpointError, damaged, read_json
from fastllava.weights.progress import stderr_is_terminal

from .shards import TensorInfo, read_header

# Small metadata files the engine reads, plus the weights. Never *.bin/*.pt/*.msgpack/*.h5/onnx.
_CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer.model"]
_WEIGHT_PATTERNS = ["*.safetensors"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_UNSUPPORTED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5")


def resolve_model_path(model: str | os.PathLike, *, revision: str | None = None,
                       progress: bool = False, config_only: bool = False) -> pathlib.Path:
    """The local folder holding checkpoint `model`.

    `model` is an existing local folder (returned as is, `~` expanded) or a hub id "owner/name",
    fetched with huggingface_hub into its cache (configs, tokenizer, templates, safetensors; with
    `config_only` no weights, e.g. for the config of a tower whose weights ship elsewhere).
    HF_HUB_OFFLINE=1 (read at call time) restricts it to the cache.
    """
    text = os.fspath(model)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {text!r} is a file; expected a folder")
    if text.startswith((".", "/", "~")) or _HUB_ID.fullmatch(text) is None:
        raise CheckpointError(
            f"checkpoint folder {text!r} does not exist (and is not a hub id owner/name)")
    return _download(text, revision, progress, config_only)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download(repo_id: str, revision: str | None, progress: bool,
              config_only: bool) -> pathlib.Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)
    from tqdm.auto import tqdm

    class _Silent(tqdm):  # snapshot_download's bars: only on a terminal, and when asked for
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    offline = _offline()
    where = f"hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    patterns = _CONFIG_PATTERNS + ([] if config_only else _WEIGHT_PATTERNS)
    bars = progress and stderr_is_terminal()
    if progress and not bars:
        print(f"fetching {where} ({'cache only' if offline else 'hub or cache'})",
              file=sys.stderr, flush=True)
    silence = not bars and not are_progress_bars_disabled()
    if silence:  # the per-file download bars ignore tqdm_class
        disable_progress_bars()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   local_files_only=offline,
                                   tqdm_class=None if bars else _Silent)
    except errors.GatedRepoError:
        cause = "the repo is gated: accept its licence on huggingface.co and log in (HF_TOKEN)"
    except errors.RepositoryNotFoundError:
        cause = "no such repo on the hub, or it is private (log in with HF_TOKEN)"
    except errors.RevisionNotFoundError:
        cause = f"the repo has no revision {revision!r}"
    except errors.IncompleteSnapshotError:
        cause = "its cached copy is incomplete and the hub cannot be reached to complete it"
    except errors.LocalEntryNotFoundError:
        cause = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline
                 else "it is not in the local cache and the hub could not be reached")
    except Exception as exc:  # network / HTTP / disk: one clear line, not a library traceback
        first_line = (str(exc).splitlines() or [""])[0]
        cause = f"download failed: {type(exc).__name__}: {first_line}"
    else:
        return pathlib.Path(folder)
    finally:
        if silence:
            enable_progress_bars()
    raise CheckpointError(f"cannot fetch {where}: {cause}")


def list_safetensors(path: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Tensor name → the safetensors file holding it, for checkpoint folder `path` (see
    `read_shards`)."""
    return {name: info.file for name, info in read_shards(path).items()}


def read_shards(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor name → its file, dtype and shape, for checkpoint folder `path`.

    Uses model.safetensors.index.json (its weight_map) when present, else model.safetensors, else
    every *.safetensors in the folder (a name in two files is an error). Every shard's header is
    read and checked (shards.read_header), so a damaged or truncated shard, or an index naming a
    tensor its shard lacks, is a CheckpointError here, before any tensor is read.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _read_indexed(folder, index)
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() \
        else sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for pat in _UNSUPPORTED_WEIGHTS for p in folder.glob(pat))
        hint = (f"; found {others[:3]}: .bin/.pt (pickle) checkpoints are not supported, convert "
                "them to safetensors") if others else \
            " (.bin/.pt pickle checkpoints are not supported either)"
        raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in both {tensors[name].file.name} and "
                                      f"{file.name} ({folder})")
            tensors[name] = info
    return tensors


def _read_indexed(folder: pathlib.Path, index: pathlib.Path) -> dict[str, TensorInfo]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()):
        raise damaged(index, "no 'weight_map' object of tensor name → shard file")
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} names shard file(s) {missing} that are not in {folder}")
    headers = {f: read_header(folder / f) for f in sorted(set(weight_map.values()))}
    absent = [(name, f) for name, f in weight_map.items() if name not in headers[f]]
    if absent:
        name, file = absent[0]
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise damaged(index, f"it lists tensor {name!r}{more} in {file}, which does not hold it",
                      f"re-download {index.name} and {file}")
    return {name: headers[f][name] for name, f in weight_map.items()}
