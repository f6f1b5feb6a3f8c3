#!/usr/bin/env python
"""A small data set in a real on-disk layout, to try the pipeline without the real data:
`python scripts/synthetic.py --layout {cub,cars,sop} --out DIR`."""

import sys

from idml.cli import run_guarded, synthetic_main

if __name__ == "__main__":
    sys.exit(run_guarded(synthetic_main))
