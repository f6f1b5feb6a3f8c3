#!/usr/bin/env python
"""Search a folder of images with an exported model:
`python scripts/search.py --model model.pt --gallery DIR --query IMG -k 10`."""

import sys

from idml.cli import run_guarded, search_main

if __name__ == "__main__":
    sys.exit(run_guarded(search_main))
