#!/usr/bin/env bash
# One short GPU check (device machine, or any CUDA box): NCCL 1-GPU run of each stage, bf16,
# channels_last, FFCV availability, and one timed search epoch per method on the paper-size
# CIFAR-10 supernet (synthetic 3x32x32 batches). Writes everything under $OUT (default runs/gpu).
#   OUT=... DATA=<fashion-mnist gz dir> STEPS=<timed steps> bash bench/gpu_check.sh
# STAGES picks parts (default: all, in this order): search train evaluate epochs compile; train
# reads GENOTYPE (default: search_jac's). Timed epochs run EPOCHS (default 2) epochs of STEPS
# steps: the first carries cudnn tuning and first calls (train's epoch 1 on an H200 was 29x slower
# than its epoch 2), so the last epoch's img/s is the throughput.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-runs/gpu}; DATA=${DATA:-/usr/share/datasets/fashion-mnist}; STEPS=${STEPS:-30}
PY=${PY:-python3}; OUT=${WORK:-$FINAL/work}; RUNS="$OUT/runs"; mkdir -p "$RUNS" "$FINAL"
TR=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
PREC=${PREC:-bf16}; STAGES=" ${STAGES:-search train evaluate epochs compile} "; EPOCHS=${EPOCHS:-2}
GENOTYPE=${GENOTYPE:-$RUNS/search_jac/genotype.json}
want() { [[ "$STAGES" == *" $1 "* ]]; }
ok() { echo "CHECK $1: $2" | tee -a "$OUT/checks.txt"; }
step() { local name=$1; shift; local t0=$(date +%s.%N)
  if timeout "${TMO:-240}" "$@" > "$OUT/$name.log" 2>&1; then ok "$name" "pass ($(awk "BEGIN{print $(date +%s.%N) - $t0}") s)";
  else ok "$name" "FAIL rc=$? ($(tail -2 "$OUT/$name.log" | tr '\n' ' '))"; fi; }

"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
import torch.distributed as d
print("nccl available", d.is_nccl_available(), "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
try:
    import ffcv; print("ffcv", ffcv.__version__)
except Exception as e: print("ffcv unavailable:", type(e).__name__, e)
PY

# 1. search (DSRNA-Jacobian and DSRNA-CB smoke configs), train, evaluate: NCCL, 1 GPU, bf16, channels_last
want search && step search_jac "${TR[@]}" -m dsrna_dist.search --config configs/search/fmnist_tiny_dsrna_jacobian.yaml \
  --data.root="$DATA" --dist.mixed_precision="$PREC" --run.out_dir="$RUNS" --run.name=search_jac
want search && step search_cb "${TR[@]}" -m dsrna_dist.search --config configs/search/fmnist_tiny_dsrna_cb.yaml \
  --data.root="$DATA" --dist.mixed_precision="$PREC" --run.out_dir="$RUNS" --run.name=search_cb
want train && step train "${TR[@]}" -m dsrna_dist.train --config configs/train/fmnist_tiny.yaml \
  --model.genotype="$GENOTYPE" --data.root="$DATA" --dist.mixed_precision="$PREC" \
  --dist.channels_last=true --run.out_dir="$RUNS" --run.name=train
want evaluate && step evaluate "${TR[@]}" -m dsrna_dist.evaluate --config configs/eval/fmnist_tiny.yaml \
  --checkpoint="$RUNS/train/checkpoints/best.pt" --data.root="$DATA" --run.out_dir="$RUNS" --run.name=eval
grep -h -i "nccl\|backend\|world" "$OUT"/*.log | sort | uniq -c | head -20 > "$OUT/backend_lines.txt"

# 2. one timed search epoch per method, paper-size CIFAR-10 supernet on synthetic data
want epochs && for m in ${METHODS:-darts pcdarts dsrna_jacobian_fast dsrna_cb_fast}; do
  step "epoch_$m" "${TR[@]}" -m dsrna_dist.search --config "configs/search/cifar10_${m}.yaml" \
    --data.name=synthetic --data.synthetic_size=$((512 * STEPS)) \
    --epochs="$EPOCHS" --steps_per_epoch="$STEPS" --strategy.arch_start_epoch=0 --dist.mixed_precision="$PREC" --run.out_dir="$RUNS" \
    --run.name="epoch_$m" --run.progress=false
done
"$PY" - "$RUNS" <<'PY' | tee "$OUT/epoch_times.txt"
import json, sys, pathlib
for s in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    d = json.loads(s.read_text())
    keep = {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and len(str(v)) < 80}
    print(s.parent.name, json.dumps(keep))
for log in sorted(pathlib.Path(sys.argv[1]).glob("*/search.log")):  # img/s per epoch: the last is warm
    rates = [ln.rsplit(",", 1)[-1].strip() for ln in log.read_text().splitlines() if " INFO epoch " in ln and "img/s" in ln]
    print(log.parent.name, "img/s per epoch:", " | ".join(r.replace(" img/s", "") for r in rates))
PY
# 3. torch.compile of the retrained network (GPU only path), last because it may be slow
want compile && step train_compile "${TR[@]}" -m dsrna_dist.train --config configs/train/fmnist_tiny.yaml \
  --model.genotype="$GENOTYPE" --data.root="$DATA" --dist.mixed_precision="$PREC" \
  --dist.compile=true --run.out_dir="$RUNS" --run.name=train_compile

# package: the few summary files at the top of $FINAL, every log and run artefact (no checkpoints) in one tarball
cp "$OUT"/checks.txt "$OUT"/env.txt "$OUT"/epoch_times.txt "$OUT"/backend_lines.txt "$FINAL"/ 2>/dev/null
tar czf "$FINAL/gpu_runs.tgz" --exclude='*.pt' -C "$OUT" . 2>/dev/null
