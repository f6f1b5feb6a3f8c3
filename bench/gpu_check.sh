#!/usr/bin/env bash
# The one command for the lent GPU machine (H100/H200; torch 2.11 there, no network, no
# wandb or DALI): builds idml._C in place for sm_90 with that machine's torch, runs the
# CUDA tests, a 2-step DDP run over nccl, then the benchmarks at full size, printing one
# table of timings and speed-ups, and last a profile of each target (bench/gpu_profile.py).
# Budget: at most about 6 minutes (IDML_CHECK_SECONDS, below, plus 15 s for a step killed
# at the deadline); give the device tool's run a timeout_s of about 420. Full logs land in
# $OUT (default /tmp/idml_gpu_check). Usage: bash bench/gpu_check.sh
# Before spending device time on a change to csrc/, bench/device_torch_check.sh builds and
# tests it here under that machine's torch, without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
# The extension is built in place, not installed: torchrun runs scripts/train.py as a file,
# which finds the package only through PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
out="${OUT:-/tmp/idml_gpu_check}"
mkdir -p "$out"
"$python" -c "import torch; print('torch', torch.__version__, '| GPU', torch.cuda.get_device_name(0))" || {
  echo "no CUDA GPU is visible to torch: nothing to check"; exit 1; }

start=$(date +%s)
deadline=$(( start + ${IDML_CHECK_SECONDS:-350} ))
# Runs a step for at most $1 seconds and never past the deadline: SIGINT first, so that
# pytest still prints what it has, SIGKILL 15 s later for a process stuck in a CUDA call.
limited() {
  local cap=$1 left=$(( deadline - $(date +%s) ))
  shift
  timeout -s INT -k 15 "$(( left < cap ? (left > 1 ? left : 1) : cap ))" "$@"
}
stopped() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ] && echo "$2: stopped at its time limit"; }

limited 240 "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1
build_status=$?
if [ "$build_status" -ne 0 ]; then
  stopped "$build_status" build
  grep -E -m 30 "error|FAILED" "$out/build.log"
  tail -25 "$out/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

limited 150 "$python" -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25
status=${PIPESTATUS[0]}
stopped "$status" tests && status=1

# DDP on the card: torchrun with one process joins an nccl group of one and runs DDP and
# the gathers over nccl for real, then evaluates on the GPU (--bn-freeze 0 converts to
# SyncBatchNorm, which with one process computes plain BatchNorm). The run's checkpoints
# (~190 MB) go to a temporary folder: $OUT comes back from the GPU machine, only small files.
echo "DDP smoke run (torchrun, 1 process, nccl, 2 steps):"
limited 120 "$python" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py \
  --dataset digits --model resnet18 --pretrained none --batch-size 64 --epochs 1 --max-steps 2 --warm 0 \
  --bn-freeze 0 --workers 2 --wandb disabled --LOG_DIR "$(mktemp -d)" > "$out/ddp.log" 2>&1
ddp_status=$?
stopped "$ddp_status" "DDP smoke run"
tr '\r' '\n' < "$out/ddp.log" | grep -E "^training IDML|unseen classes:" || tail -20 "$out/ddp.log"
echo "DDP smoke run exit code: $ddp_status"
[ "$ddp_status" -eq 0 ] || status=1

limited 300 "$python" -m pytest bench --benchmark-only --bench-scale full -q -p no:cacheprovider \
  -k cuda --benchmark-json="$out/benchmarks.json" --benchmark-columns=min,median,rounds 2>&1 \
  | tee "$out/bench.log" | tail -60
bench_status=${PIPESTATUS[0]}
stopped "$bench_status" benchmarks
[ "$bench_status" -eq 5 ] && echo "benchmarks: none collected (no GPU visible?)"
[ "$bench_status" -eq 0 ] || status=1  # a failure, a target missed at full scale, or nothing run

# Diagnostics, not checks (its status is only reported): where each target's time goes
# (device busy or waiting for the host, launches, top kernels); full tables in $out/profile.txt.
# (Seven files in $OUT in all: the GPU machine sends back at most eight.)
if [ $(( deadline - $(date +%s) )) -lt 30 ]; then
  echo "profile: skipped (less than 30 s left before the deadline; importing torch alone takes several)"
else
  limited 60 "$python" bench/gpu_profile.py --out "$out" 2>&1 | tee "$out/profile.log"
  profile_status=${PIPESTATUS[0]}
  stopped "$profile_status" profile
  [ "$profile_status" -eq 0 ] || echo "profile exit code: $profile_status"
fi
echo "total: $(( $(date +%s) - start )) s"
exit "$status"
