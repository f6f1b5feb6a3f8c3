#!/usr/bin/env python
"""Export a checkpoint as TorchScript: `python scripts/export.py --resume CKPT --out model.pt`."""

import sys

from idml.cli import export_main, run_guarded

if __name__ == "__main__":
    sys.exit(run_guarded(export_main))
