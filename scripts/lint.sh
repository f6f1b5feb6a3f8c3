#!/usr/bin/env bash
# Checks the formatting and lint rules CI enforces: ruff (pyproject.toml) for Python,
# clang-format (.clang-format) for C++ and CUDA. `bash scripts/lint.sh --fix` applies them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
sources=$(git ls-files '*.cpp' '*.h' '*.cu')
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix . && .venv/bin/ruff format .
  .venv/bin/clang-format -i $sources
else
  .venv/bin/ruff check . && .venv/bin/ruff format --check .
  .venv/bin/clang-format --dry-run --Werror $sources
  echo "lint: ruff and clang-format find nothing to change"
fi
