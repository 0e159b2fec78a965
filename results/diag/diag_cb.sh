#!/bin/bash
# Diagnostic (a), issue 15: DSRNA-CB at the paper's gamma 0.01, seed 0, the grid's search command
# with one change: the bound's eps starts at 1e-5 (near where the eps rule settles) instead of 0.03.
# Question: is the first arch epoch's ~1e6 share (and the freeze after it) caused by the initial eps?
set -euo pipefail
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 python -m dsrna_dist.search --config=configs/search/fmnist_small_dsrna_cb.yaml \
  --robustness.trade_off=gamma --arch_optim.schedule=cosine --arch_optim.lr=0.15 \
  --robustness.certified.eps=1e-5 --run.out_dir=results/diag --run.name=dsrna_cb_gamma_eps1e-5_s0 \
  --run.seed=0 --run.progress=false
