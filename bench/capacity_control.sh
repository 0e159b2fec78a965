#!/usr/bin/env bash
# Capacity control for issue 15's grid: retrain a found cell at a narrower width (same recipe,
# seed and eval config as the grid), to tell "this cell" from "a net this small".
#   bash bench/capacity_control.sh darts_s0 5      # the DARTS seed-0 cell at C=5 (14.1k parameters,
#                                                  # the DSRNA-CB seed-0 cell's 14.2k at C=8)
#   bash bench/capacity_control.sh darts_s0 5 adv  # the same under PGD adversarial training
# Resumable (each stage is skipped once its summary exists); results/grid/control/<run>_c<C>/
# (natural) or results/grid/control/<run>_c<C>_adv/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?search run, e.g. darts_s0}; C=${2:?init channels}; RECIPE=${3:-nat}; PY=${PY:-.venv/bin/python}
SEED=${RUN##*_s}
case "$RECIPE" in
  nat) CFG=configs/train/fmnist_small.yaml; D=results/grid/control/${RUN}_c${C} ;;
  adv) CFG=configs/train/fmnist_small_pgd_at.yaml; D=results/grid/control/${RUN}_c${C}_adv ;;
  *) echo "capacity_control.sh: recipe must be nat or adv, got '$RECIPE'" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$D/train/summary.json" ] || "$PY" -m dsrna_dist.train --config="$CFG" \
  --model.genotype="results/grid/search/$RUN/genotype.json" --model.init_channels="$C" \
  --run.out_dir="$D" --run.name=train --run.seed="$SEED" --run.progress=false
[ -f "$D/eval/summary.json" ] || "$PY" -m dsrna_dist.evaluate --config=configs/eval/fmnist_small_grid.yaml \
  --checkpoint="$D/train/checkpoints/best.pt" --run.out_dir="$D" --run.name=eval --run.seed="$SEED" --run.progress=false
