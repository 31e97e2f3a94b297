"""``python -m pysim``: see :mod:`pysim.cli`."""

import sys

from pysim.cli import main

if __name__ == "__main__":
    sys.exit(main())
