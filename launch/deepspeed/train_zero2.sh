#!/usr/bin/env bash
# Retrain a genotype with DeepSpeed ZeRO-2 on all local GPUs (or NPROC CPU ranks).
#   GENOTYPE=runs/search/genotype.json CONFIG=configs/train/cifar10.yaml NPROC=8 launch/deepspeed/train_zero2.sh [--key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-configs/train/cifar10.yaml}
GENOTYPE=${GENOTYPE:-DARTS_V2}
if command -v nvidia-smi >/dev/null 2>&1; then NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; else NPROC=${NPROC:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m dsrna_dist.train --config "$CONFIG" \
  --model.genotype="$GENOTYPE" --engine=deepspeed --zero_stage=2 "$@"
