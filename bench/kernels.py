"""Kernel benchmark: every Triton kernel at the real LLaVA shapes, next to its torch reference and
torch SDPA, in roofline units. The implementation is fastllava.benchmarks.kernel_table (also
`fastllava bench kernels`); see bench/README.md.

    python bench/kernels.py [--out bench/results/] [--smoke] [--only NAME]
"""

import sys

from fastllava.benchmarks.kernel_table import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
