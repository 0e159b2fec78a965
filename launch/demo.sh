#!/usr/bin/env bash
# The offline main job: DSRNA search -> retrain -> attacks + certification -> report, on
# Fashion-MNIST with 2 CPU ranks (the same commands run on N GPUs: see README "Full scale").
#   METHOD=jacobian|cb  (DSRNA metric, default jacobian)   NPROC=2   OUT=runs/demo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
METHOD=${METHOD:-jacobian}
NPROC=${NPROC:-2}
OUT=${OUT:-runs/demo}
BIN=$(dirname "$PY")
case "$METHOD" in jacobian|cb) ;; *) echo "error: METHOD must be jacobian or cb, got '$METHOD'" >&2; exit 2;; esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ACCEL=("$BIN/accelerate" launch --multi_gpu --num_processes "$NPROC" --num_machines 1
       --mixed_precision no --dynamo_backend no --main_process_port 0)
TORCHRUN=("$BIN/torchrun" --standalone --nproc_per_node "$NPROC")
start=$(date +%s)

echo "== 1/4 search (DSRNA-$METHOD, $NPROC ranks)"
"${ACCEL[@]}" -m dsrna_dist.search --config "configs/search/fmnist_tiny_dsrna_${METHOD}.yaml" \
  --run.out_dir="$OUT" --run.name=search
echo "== 2/4 retrain the found cell ($NPROC ranks)"
"${TORCHRUN[@]}" -m dsrna_dist.train --config configs/train/fmnist_tiny.yaml \
  --model.genotype="$OUT/search/genotype.json" --run.out_dir="$OUT" --run.name=train
echo "== 3/4 attacks + certification ($NPROC ranks)"
"${TORCHRUN[@]}" -m dsrna_dist.evaluate --config configs/eval/fmnist_tiny.yaml \
  --checkpoint="$OUT/train/checkpoints/best.pt" --run.out_dir="$OUT" --run.name=eval
echo "== 4/4 report"
"$PY" -m dsrna_dist.report --runs="$OUT" --out="$OUT/report/report.md"
echo "done in $(( $(date +%s) - start )) s; results: $OUT/report/report.md (TensorBoard: tensorboard --logdir $OUT)"
