#!/usr/bin/env bash
# Arch-lr schedule experiment (issue 11, "searches that converge"): the fmnist_small searches of
# DARTS, PC-DARTS and DSRNA-Jacobian, seeds 0-2, under the committed `cosine` arch schedule and
# under `cosine2` with the arch lr x 4/3 (the same sum of step sizes). Sequential, one thread,
# idempotent (a finished search is skipped, a killed one resumes from its checkpoint).
#   bash bench/arch_schedule.sh cosine|cosine2 [OUT=runs/sched] [METHODS="darts pcdarts dsrna_jacobian"]
#   python bench/schedule_compare.py runs/sched/cosine runs/sched/cosine2 --ref results/grid/search
set -u
cd "$(dirname "$0")/.."
sched=${1:?usage: arch_schedule.sh cosine|cosine2}
out=${OUT:-runs/sched}/$sched
PY=${PY:-.venv/bin/python}
mkdir -p "$out"
for seed in 2 0 1; do
  for m in ${METHODS:-darts pcdarts dsrna_jacobian}; do
    [ -f "$out/${m}_s$seed/genotype.json" ] && continue
    extra=()
    if [ "$sched" = cosine2 ]; then  # the config's arch lr (0.075 or 0.15) x 4/3
      lr=$("$PY" -c "from dsrna_dist.config import SearchConfig, load_config; \
c=load_config(SearchConfig, 'configs/search/fmnist_small_$m.yaml', {}); print(round(c.arch_optim.lr*4/3, 6))")
      extra=(--arch_optim.schedule=cosine2 "--arch_optim.lr=$lr")
    fi
    echo "== $(date +%T) $sched $m s$seed ${extra[*]}"
    OMP_NUM_THREADS=1 /usr/bin/time -f "cpu_s %U %S" "$PY" -m dsrna_dist.search \
      --config="configs/search/fmnist_small_$m.yaml" "${extra[@]}" --run.out_dir="$out" --run.name="${m}_s$seed" \
      --run.seed="$seed" --run.progress=false > "$out.${m}_s$seed.log" 2>&1
    tail -n 1 "$out.${m}_s$seed.log"
  done
done
echo "== done $(date +%T)"
