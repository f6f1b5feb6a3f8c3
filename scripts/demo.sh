#!/usr/bin/env bash
# Sets up .venv, builds idml._C, and trains IDML on the embedded digits (0-4 train, as 40
# classes: each digit under each of the 8 symmetries of the square; 5-9 are the unseen
# classes): a ResNet-18 from scratch at 32 px, evaluated before training and after every
# epoch. 6 epochs of 60 steps: about 6 min on 2 idle AVX2 cores (README). Data live in memory,
# so --workers 0 (loader processes would only compete with the training threads for the
# cores). Extra arguments go to scripts/train.py (they override these).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/train.py --dataset digits --model resnet18 --pretrained none \
  --epochs 6 --batch-size 120 --lr 1e-4 --warm 0 --bn-freeze 1 --workers 0 --LOG_DIR logs "$@"
