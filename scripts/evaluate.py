#!/usr/bin/env python
"""Evaluate a checkpoint on the unseen test classes: `python scripts/evaluate.py --help`."""

import sys

from idml.cli import evaluate_main, run_guarded

if __name__ == "__main__":
    sys.exit(run_guarded(evaluate_main))
