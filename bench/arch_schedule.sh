#!/usr/bin/env bash
# Arch-lr schedule experiment (issue 11, "searches that converge"): the fmnist_small searches of
# DARTS, PC-DARTS, DSRNA-Jacobian and DSRNA-CB, seeds 0-2, under `cosine2` (the configs' schedule
# since the fifteenth session) and under the `cosine` they had before, at 3/4 of the arch lr (the
# same sum of step sizes). Sequential, one thread, idempotent (a finished search is skipped, a
# killed one resumes from its checkpoint).
#   bash bench/arch_schedule.sh cosine|cosine2 [OUT=runs/sched] [METHODS="darts pcdarts dsrna_jacobian dsrna_cb"]
#   python bench/schedule_compare.py runs/sched/cosine runs/sched/cosine2 --ref results/grid/search
set -u
cd "$(dirname "$0")/.."
sched=${1:?usage: arch_schedule.sh cosine|cosine2}
out=${OUT:-runs/sched}/$sched
PY=${PY:-.venv/bin/python}
mkdir -p "$out"
for seed in 2 0 1; do
  for m in ${METHODS:-darts pcdarts dsrna_jacobian dsrna_cb}; do
    [ -f "$out/${m}_s$seed/genotype.json" ] && continue
    # the config's arch lr (0.1 or 0.2), x 3/4 for cosine (the same sum of step sizes)
    lr=$("$PY" -c "from dsrna_dist.config import SearchConfig, load_config; \
c=load_config(SearchConfig, 'configs/search/fmnist_small_$m.yaml', {}); \
print(round(c.arch_optim.lr * (0.75 if '$sched' == 'cosine' else 1.0), 6))")
    extra=(--arch_optim.schedule="$sched" "--arch_optim.lr=$lr")
    echo "== $(date +%T) $sched $m s$seed ${extra[*]}"
    OMP_NUM_THREADS=1 /usr/bin/time -f "cpu_s %U %S" "$PY" -m dsrna_dist.search \
      --config="configs/search/fmnist_small_$m.yaml" "${extra[@]}" --run.out_dir="$out" --run.name="${m}_s$seed" \
      --run.seed="$seed" --run.progress=false > "$out.${m}_s$seed.log" 2>&1
    tail -n 1 "$out.${m}_s$seed.log"
  done
done
echo "== done $(date +%T)"
