#!/usr/bin/env bash
# Creates .venv (Python 3.10+), installs the pinned dependencies and builds the extension
# idml._C in place. Safe to run again: it reinstalls only when a requirements file changed
# and rebuilds only when the sources did. Usage: bash scripts/setup.sh [requirements file]
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements.txt}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat "$requirements" requirements.txt | sha1sum | cut -c1-12)-$(basename "$requirements")"
if [ ! -f "$stamp" ]; then
  echo "setup: installing $requirements (torch is large: a few minutes the first time)"
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -r "$requirements"; } \
      > .venv/install.log 2>&1; then
    tail -30 .venv/install.log; echo "setup: installing $requirements failed (whole log: .venv/install.log)"; exit 1
  fi
  touch "$stamp"
fi
# pip builds in a new temporary folder every time, so each build is a full one (minutes):
# the extension is rebuilt only when csrc/ or setup.py changed after it was built, torch was
# reinstalled, or it does not load. Delete idml/_C*.so to force a rebuild.
root="$(pwd)"
extension_loads() {  # from another folder: through the editable install, as scripts/ import it
  (cd / && "$root/.venv/bin/python" -c "import idml.ops as o; assert o.EXTENSION_ERROR is None" 2>/dev/null)
}
library="$(find idml -maxdepth 1 -name '_C*.so' -print -quit)"  # empty before the first build
if [ -n "$library" ] && [ -z "$(find csrc setup.py .venv/lib/python3*/site-packages/torch/version.py \
    -newer "$library" -print -quit)" ] && extension_loads; then
  echo "setup: idml._C is up to date and loads"
else
  # Without a GPU, build the CUDA kernels for the Hopper cards only unless told otherwise
  # (each architecture costs compile time); with a GPU, torch builds for the visible ones.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(.venv/bin/python -c 'import torch; print("" if torch.cuda.is_available() else "9.0")')}"
  [ -n "$TORCH_CUDA_ARCH_LIST" ] || unset TORCH_CUDA_ARCH_LIST
  echo "setup: building the idml._C extension (the CUDA kernels take a few minutes the first time)"
  if ! MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/python -m pip install --no-build-isolation --no-deps -e . \
      > .venv/build.log 2>&1; then
    tail -40 .venv/build.log; echo "setup: building idml._C failed (whole log: .venv/build.log)"; exit 1
  fi
  .venv/bin/python -c "import idml.ops as o; assert o.EXTENSION_ERROR is None, o.EXTENSION_ERROR; print('setup: idml', __import__('idml').__version__, 'with its compiled ops is ready')"
fi
