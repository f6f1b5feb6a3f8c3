#!/usr/bin/env bash
# Sets up .venv, builds idml._C, and trains IDML on the embedded digits (0-4 train, 5-9 are
# the unseen classes): a ResNet-18 from scratch at 32 px, evaluated before training and
# after every epoch. Extra arguments go to scripts/train.py (they override these).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/train.py --dataset digits --model resnet18 --pretrained none \
  --epochs 15 --batch-size 120 --lr 1e-4 --warm 0 --bn-freeze 1 --workers 2 --LOG_DIR logs "$@"
