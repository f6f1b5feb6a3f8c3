#!/usr/bin/env python
"""Train IDML: `python scripts/train.py --help` lists every flag."""

import sys

from idml.cli import run_guarded, train_main

if __name__ == "__main__":
    sys.exit(run_guarded(train_main))
