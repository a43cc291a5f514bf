"""The bench scripts' shared plumbing lives in the package, fastllava.benchmarks.common, so that
`fastllava bench` runs it from a wheel install; the scripts here keep importing `common`."""

from fastllava.benchmarks.common import *  # noqa: F401,F403
from fastllava.benchmarks.common import REPO  # noqa: F401  (the checkout root)
