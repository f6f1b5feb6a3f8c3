#!/usr/bin/env bash
# Rehearses, here and without a GPU, what bench/gpu_check.sh first depends on: the GPU
# machine's own torch (2.11.0+cu130 and torchvision 0.26.0, older than requirements.txt's
# pins) builds the extension for sm_90 with this machine's nvcc, and the test suite passes
# on the CPU under it. Run it after changing csrc/ or the torch calls and before spending
# device time: a header or API that torch 2.11 lacks then costs minutes here, not the GPU
# session's budget. Needs PyPI (about 3 GB the first time, into $VENV). Works on a copy of
# the working tree (uncommitted changes included), so .venv's build of idml._C is untouched.
# Usage: bash bench/device_torch_check.sh [pytest arguments; default: scripts/test.sh's]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-/tmp/idml_device_torch}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# The test requirements with that machine's torch and torchvision, without what it lacks
# (wandb, DALI, pytorch-metric-learning: their tests skip there as here) and with the
# setuptools torch 2.11 asks for (< 82; requirements.txt pins a newer one). PIP_CONFIG_FILE:
# the development machine's pip configuration caps torch at the release it keeps on disk.
grep -h -v -E '^\s*(#|-r|$)|^(torch|torchvision|wandb|nvidia-dali[a-z0-9-]*|pytorch-metric-learning|setuptools)==' \
  requirements.txt requirements-test.txt > "$work/device-requirements.txt"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 \
  -r "$work/device-requirements.txt"
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda)"

git ls-files -z --cached --others --exclude-standard | tar -c --null --ignore-failed-read -T - 2>/dev/null | tar -x -C "$work"
cd "$work"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$venv/bin/python" setup.py build_ext --inplace \
  > build.log 2>&1 || { grep -E -m 30 "error|FAILED" build.log; tail -25 build.log; echo "build: failed"; exit 1; }
echo "build for sm_90: OK ($(grep -c -i "warning:" build.log) compiler warnings)"
PYTHONPATH="$work" "$venv/bin/python" -c "import idml.ops as o; assert o.EXTENSION_ERROR is None, o.EXTENSION_ERROR"
[ $# -gt 0 ] || set -- tests bench --benchmark-disable  # what scripts/test.sh runs
PYTHONPATH="$work" "$venv/bin/python" -m pytest "$@" -q -p no:cacheprovider
