#!/bin/bash
# Diagnostic (b), issue 15 (now also a search option: --arch_optim.reset_state_at=[3]): DSRNA-CB at the paper's gamma 0.01, seed 0 (or the first argument), exactly the grid's search
# command, but the arch optimizer's Adam state (exp_avg, exp_avg_sq, step) is cleared once, after
# the first arch epoch (epoch 2): the search is killed once that epoch's checkpoint exists, the
# state is cleared in the checkpoint (its statistics kept in adam_reset.json) and the same command
# resumes it. Question: is it Adam's second moment that holds alpha after the first epoch?
set -uo pipefail
cd "$(dirname "$0")/../.."
S=${1:-0}  # the seed (argument; 0 by default)
RUN=results/diag/dsrna_cb_gamma_adamreset_s$S
CMD="python -m dsrna_dist.search --config=configs/search/fmnist_small_dsrna_cb.yaml --robustness.trade_off=gamma --arch_optim.schedule=cosine --arch_optim.lr=0.15 --run.out_dir=results/diag --run.name=dsrna_cb_gamma_adamreset_s$S --run.seed=$S --run.progress=false"
export OMP_NUM_THREADS=1
if [ ! -f $RUN/adam_reset.json ]; then
  $CMD & P=$!
  while kill -0 $P 2>/dev/null; do   # epoch = epochs completed: 3 after epoch 2
    sleep 3
    e=$(python -c "import torch; print(torch.load('$RUN/checkpoints/last.pt', weights_only=True)['epoch'])" 2>/dev/null)
    [ "$e" = "3" ] && { kill $P; wait $P; break; }
  done
  RUN=$RUN python - <<'PY'
import json, os, torch
run = os.environ["RUN"]
ck = f"{run}/checkpoints/last.pt"
c = torch.load(ck, map_location="cpu", weights_only=True)
assert c["epoch"] == 3, c["epoch"]
st = c["optimizers"]["arch"]["state"]
info = {"epoch": c["epoch"], "cleared": {str(k): {"exp_avg_sq_max": float(v["exp_avg_sq"].max()),
        "exp_avg_sq_median": float(v["exp_avg_sq"].median()), "step": float(v["step"])} for k, v in st.items()}}
c["optimizers"]["arch"]["state"] = {}
torch.save(c, ck + ".tmp")
os.replace(ck + ".tmp", ck)
json.dump(info, open(f"{run}/adam_reset.json", "w"), indent=1)
PY
fi
$CMD
