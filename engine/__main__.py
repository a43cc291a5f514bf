"""`python -m fastllava ...`: the same command line as the `fastllava` script."""

import sys

from fastllava.cli import main

if __name__ == "__main__":
    sys.exit(main())
