#!/usr/bin/env python
"""A published command line trained with several seeds, mean +- std of every metric: `scripts/reproduce.py --help`."""

import sys

from idml.cli import run_guarded
from idml.reproduce import reproduce_main

if __name__ == "__main__":
    sys.exit(run_guarded(reproduce_main))
