"""fastllava: a from-scratch LLaVA inference engine.

`from fastllava import LLaVA` is the public entry point. The import is lazy so that
torch-free submodules (the scheduler, the schema) stay importable without torch.
`CheckpointError` (a ValueError) is what loading raises for a missing or damaged checkpoint.
"""

from fastllava.checkpoint_files import CheckpointError

__all__ = ["CheckpointError", "LLaVA"]


def __getattr__(name):
    if name == "LLaVA":
        from fastllava.api import LLaVA

        return LLaVA
    raise AttributeError(f"module 'fastllava' has no attribute {name!r}")
