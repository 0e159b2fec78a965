#!/bin/bash
# DSRNA-CB at the paper's gamma 0.01, seed 0, with the bound's eps starting at 1e-5 (near where the
# eps rule settled in the grid run) instead of 0.03: is the first epoch's ~1e6 share what freezes alpha?
cd /work/main
kill -STOP $1
OMP_NUM_THREADS=1 .venv/bin/python -m dsrna_dist.search --config=configs/search/fmnist_small_dsrna_cb.yaml \
  --robustness.trade_off=gamma --arch_optim.schedule=cosine --arch_optim.lr=0.15 \
  --robustness.certified.eps=1e-5 --run.out_dir=/work/main/results/diag --run.name=dsrna_cb_gamma_eps1e-5_s0 \
  --run.seed=0 --run.progress=false > /work/gridlogs/diag_cb.log 2>&1
echo "rc=$?" >> /work/gridlogs/diag_cb.log
kill -CONT $1
