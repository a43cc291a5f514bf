"""Installing fastllava: the editable install imports from any folder, and `fastllava serve`
without the `server` extra says what to install in one line."""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from fastllava import cli

REPO = Path(__file__).resolve().parents[1]
# What a clone holds besides the three package folders that the build needs.
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def test_editable_install_imports_from_the_folder_containing_the_clone(tmp_path):
    """Builds the failing situation for real: a copy of the clone in a folder named `fastllava`,
    installed with `pip install --no-deps --no-build-isolation --no-index -e` (offline; the build
    uses this environment's setuptools) into a fresh venv. The venv sees this environment's
    packages (torch, pip, setuptools) through a .pth listing its site-packages folders, whose own
    .pth files (another editable fastllava) therefore do not run. Then, from the folder
    CONTAINING the clone, where Python's path finder sees `fastllava/` as a namespace package,
    and from another folder: `from fastllava import LLaVA` must load the copy's engine/, and
    fastllava.kernels / .weights its kernels/ and weights/; the `fastllava` console script runs;
    no top-level engine/kernels/weights package is importable."""
    pytest.importorskip("pip")
    clone = tmp_path / "fastllava"
    clone.mkdir()
    for name in BUILD_FILES:
        shutil.copy(REPO / name, clone / name)
    for folder in ("engine", "kernels", "weights"):
        shutil.copytree(REPO / folder, clone / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    venv_site = Path(_run([python, "-c", "import site; print(site.getsitepackages()[0])"]
                          ).stdout.strip())
    ours = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    (venv_site / "_parent_environment.pth").write_text("\n".join(ours) + "\n")
    done = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                 "--no-index", "-e", str(clone)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    code = ("import importlib.util, fastllava, fastllava.kernels, fastllava.weights\n"
            "from fastllava import LLaVA\n"
            "print(fastllava.__file__, fastllava.kernels.__file__, fastllava.weights.__file__, "
            "LLaVA.__module__)\n"
            "print(*(importlib.util.find_spec(n) is None for n in ('engine', 'kernels', 'weights'"
            ")))\n")
    for cwd in (tmp_path, venv):   # the clone's parent, and any other folder
        done = _run([python, "-c", code], cwd=cwd)
        assert done.returncode == 0, (cwd, done.stderr)
        files, absent = done.stdout.splitlines()
        assert files.split() == [str(clone / "engine" / "__init__.py"),
                                 str(clone / "kernels" / "__init__.py"),
                                 str(clone / "weights" / "__init__.py"), "fastllava.api"], files
        assert absent == "True True True", f"top-level engine/kernels/weights importable: {absent}"
    done = _run([venv / "bin" / "fastllava", "--version"], cwd=tmp_path)
    assert done.returncode == 0 and re.fullmatch(r"fastllava \d[\w.]*\n", done.stdout), done


def test_serve_without_the_server_extra_says_what_to_install():
    """Runs the real CLI with uvicorn (and then fastapi) made unimportable (sys.modules[name] =
    None, as when the package is missing): one error line naming the module and the extra,
    exit 2, no traceback, and nothing loaded (the model path does not exist)."""
    for missing in (["uvicorn"], ["fastapi", "uvicorn"]):
        code = ("import sys\n"
                f"for name in {missing!r}: sys.modules[name] = None\n"
                "from fastllava.cli import main\n"
                "sys.exit(main(['serve', '--model', '/no/such/model']))\n")
        done = _run([sys.executable, "-c", code])
        assert done.returncode == 2, done.stderr
        assert done.stderr == (f"error: fastllava serve needs {', '.join(missing)}, not "
                               'installed: pip install "fastllava[server]"\n'), done.stderr


def test_redis_is_required_only_for_a_redis_queue(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    for url in (None, "sqlite:///jobs.db"):
        assert cli.missing_server_modules(url) == []
    for url in ("redis://localhost:6379/0", "rediss://h/0", "unix:///run/redis.sock"):
        assert cli.missing_server_modules(url) == ["redis"], url
    monkeypatch.setitem(sys.modules, "httpx", None)
    assert cli.missing_server_modules("redis://h/0") == ["httpx", "redis"]
