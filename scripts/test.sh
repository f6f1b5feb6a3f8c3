#!/usr/bin/env bash
# Sets up .venv with the test dependencies, builds the extension, runs the tests and the
# benchmarks in their quick mode (each benchmark body runs once; speed targets are reported,
# asserted only by `pytest bench --benchmark-only`).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
exec .venv/bin/python -m pytest tests bench --benchmark-disable -q "$@"
