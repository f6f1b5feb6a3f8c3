#!/usr/bin/env bash
# The one command for the lent GPU machine (H100/H200; torch 2.11 there, no network, no
# wandb or DALI): builds idml._C in place for sm_90 with that machine's torch, runs the
# CUDA tests, then the benchmarks at full size, and prints one table of timings and
# speed-ups. Budget: about 6 minutes. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
out="${OUT:-/tmp/idml_gpu_check}"
mkdir -p "$out"
"$python" -c "import torch; print('torch', torch.__version__, '| GPU', torch.cuda.get_device_name(0))"

start=$(date +%s)
"$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

"$python" -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tail -15
status=${PIPESTATUS[0]}

"$python" -m pytest bench --benchmark-only --bench-scale full -q -p no:cacheprovider -k cuda \
  --benchmark-json="$out/benchmarks.json" --benchmark-columns=min,median,rounds 2>&1 | tail -60
# DDP on the card: torchrun with one process joins an nccl group of one and runs DDP, the
# gathers and SyncBatchNorm (--bn-freeze 0) for real, then evaluates on the GPU.
echo "DDP smoke run (torchrun, 1 process, nccl, 2 steps):"
timeout 300 "$python" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py \
  --dataset digits --model resnet18 --pretrained none --batch-size 64 --epochs 1 --max-steps 2 --warm 0 \
  --bn-freeze 0 --workers 2 --wandb disabled --LOG_DIR "$out/ddp" > "$out/ddp.log" 2>&1
ddp_status=$?
grep -E "training IDML|unseen classes" "$out/ddp.log" || tail -20 "$out/ddp.log"
echo "DDP smoke run exit code: $ddp_status"
[ "$ddp_status" -eq 0 ] || status=$ddp_status

echo "total: $(( $(date +%s) - start )) s"
exit "$status"
