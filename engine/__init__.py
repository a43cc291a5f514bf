"""fastllava: a from-scratch LLaVA inference engine.

`from fastllava import LLaVA` is the public entry point; the configuration classes and the error
classes a caller catches are importable from here too (each also lives in the module named in
_PUBLIC, where the README's "Public names" table points). Imports are lazy so that torch-free
submodules (the scheduler, the schema, the CLI) stay importable without torch.
"""

from importlib import import_module

# name -> the module that defines it
_PUBLIC = {
    "LLaVA": "fastllava.api",
    "RuntimeConfig": "fastllava.runtime.config",
    "ImageLimits": "fastllava.preprocess.image_io",
    "RequestValidationError": "fastllava.schema",
    "ImageError": "fastllava.preprocess.image_io",
    "ImageFetchError": "fastllava.preprocess.image_io",
    "ImageDecodeError": "fastllava.preprocess.image_io",
    "ImageTooLargeError": "fastllava.preprocess.image_io",
    "CheckpointError": "fastllava.checkpoint_files",
    "CheckpointNotFoundError": "fastllava.checkpoint_files",
    "ConfigError": "fastllava.config",
    "WeightLoadError": "fastllava.weights.loader",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastllava' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
