#!/bin/bash
# DSRNA-CB at the paper's gamma 0.01, seed 0, exactly the grid's command, but the arch optimizer's
# Adam state (exp_avg, exp_avg_sq, step) is cleared once, after the first arch epoch (epoch 2):
# does alpha then move again? (tests "Adam's second moment holds alpha" from the grid run)
cd /work/main
kill -STOP $1
CMD=".venv/bin/python -m dsrna_dist.search --config=configs/search/fmnist_small_dsrna_cb.yaml --robustness.trade_off=gamma --arch_optim.schedule=cosine --arch_optim.lr=0.15 --run.out_dir=/work/main/results/diag --run.name=dsrna_cb_gamma_adamreset_s0 --run.seed=0 --run.progress=false"
CK=results/diag/dsrna_cb_gamma_adamreset_s0/checkpoints/last.pt
LOG=/work/gridlogs/diag_adam.log
if [ ! -f results/diag/dsrna_cb_gamma_adamreset_s0/adam_reset.json ]; then
  OMP_NUM_THREADS=1 $CMD > $LOG 2>&1 &
  P=$!
  while kill -0 $P 2>/dev/null; do
    sleep 3
    e=$(.venv/bin/python -c "import torch; print(torch.load('$CK', weights_only=True)['epoch'])" 2>/dev/null)
    [ "$e" = "3" ] && { kill $P; wait $P; break; }
  done
  OMP_NUM_THREADS=1 .venv/bin/python - >> $LOG 2>&1 <<'PY'
import json, os, torch
ck = "results/diag/dsrna_cb_gamma_adamreset_s0/checkpoints/last.pt"
c = torch.load(ck, map_location="cpu", weights_only=True)
assert c["epoch"] == 3, c["epoch"]
st = c["optimizers"]["arch"]["state"]
info = {"epoch": c["epoch"], "cleared": {str(k): {"exp_avg_sq_max": float(v["exp_avg_sq"].max()),
        "exp_avg_sq_median": float(v["exp_avg_sq"].median()), "step": float(v["step"])} for k, v in st.items()}}
c["optimizers"]["arch"]["state"] = {}
torch.save(c, ck + ".tmp"); os.replace(ck + ".tmp", ck)
json.dump(info, open("results/diag/dsrna_cb_gamma_adamreset_s0/adam_reset.json", "w"), indent=1)
print("ADAM RESET", json.dumps(info))
PY
fi
OMP_NUM_THREADS=1 $CMD >> $LOG 2>&1
echo "rc=$?" >> $LOG
kill -CONT $1
