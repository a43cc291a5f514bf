"""setuptools hook (pyproject.toml holds all metadata): only the editable install is customized.

setuptools' editable install (`pip install -e .`) appends its import finder to the END of
sys.meta_path, after Python's path finder. Run from the folder that CONTAINS the clone (itself
named `fastllava/`, with no __init__.py at its root), the path finder answers first and returns
the clone folder as an empty namespace package, so `from fastllava import LLaVA` fails
(pypa/setuptools#3557). The plain `.pth` path entry setuptools uses for src layouts cannot express
our package-dir mapping (fastllava = engine/, fastllava.kernels = kernels/, ...), so the editable
wheel installs its own finder AHEAD of the path finder instead. It maps only the package-dir
names; everything below them is found through their __path__, so new modules need no reinstall.
An explicit `--config-settings editable_mode=strict|compat` keeps setuptools' own strategies.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

FINDER_MODULE = "_fastllava_editable_finder"   # written at the root of site-packages

FINDER_SOURCE = '''\
"""Written by fastllava's editable install (setup.py): `import fastllava` loads the clone below
whatever folder Python runs from; a folder named fastllava there (no __init__.py: a namespace
package to Python's path finder) cannot shadow it. A real package or module of that name earlier
on sys.path still wins, as it would over any installed package."""
import os
import sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location

ROOTS = {roots!r}


class FastllavaEditableFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        root = ROOTS.get(fullname)
        if root is None:
            return None
        parent = fullname.rpartition(".")[0]
        if parent:   # a mapped subpackage (fastllava.kernels = kernels/): only below our parent
            if path is None or list(path) != [ROOTS.get(parent)]:
                return None
        else:
            found = PathFinder.find_spec(fullname)
            if found is not None and found.origin is not None:
                return None
        init = os.path.join(root, "__init__.py")
        return spec_from_file_location(fullname, init) if os.path.isfile(init) else None


def install():
    # Just ahead of the path finder, after any finder installed before this one: of two editable
    # installs (a venv's and its base's) the first site directory processed wins, as on sys.path.
    if FastllavaEditableFinder in sys.meta_path:
        return
    at = sys.meta_path.index(PathFinder) if PathFinder in sys.meta_path else len(sys.meta_path)
    sys.meta_path.insert(at, FastllavaEditableFinder)
'''


class _FrontFinderStrategy:
    """An editable-wheel strategy (setuptools' protocol: a context manager called with the wheel)
    that writes the finder module and the .pth that installs it."""

    def __init__(self, name: str, roots: dict[str, str]):
        self.name, self.roots = name, roots

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def __call__(self, wheel, files, mapping) -> None:
        wheel.writestr(f"{FINDER_MODULE}.py", FINDER_SOURCE.format(roots=self.roots).encode())
        # ASCII only: before Python 3.13 .pth files are read in the locale's encoding.
        wheel.writestr(f"__editable__.{self.name}.pth",
                       f"import {FINDER_MODULE}; {FINDER_MODULE}.install()\n".encode())


class EditableWheel(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        if self.mode:  # the user asked for one of setuptools' modes explicitly
            return super()._select_strategy(name, tag, build_lib)
        roots = {package: os.path.abspath(os.path.join(self.project_dir, folder))
                 for package, folder in self.distribution.package_dir.items() if package}
        return _FrontFinderStrategy(name, roots)


setup(cmdclass={"editable_wheel": EditableWheel})
