#!/usr/bin/env python
"""Export a checkpoint as TorchScript: `python scripts/export.py --resume CKPT --out model.pt`."""
import sys

from idml.cli import run_guarded
from idml.export import main

if __name__ == "__main__":
    sys.exit(run_guarded(main))
