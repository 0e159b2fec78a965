#!/usr/bin/env bash
# One torchrun agent per machine; run this on every node (launch/slurm_*.sbatch does it via srun).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 launch/torchrun_multi_node.sh dsrna_dist.train --config=...
# Environment:
#   NNODES          number of machines (required)
#   NODE_RANK       this machine's index 0..NNODES-1 (required; used by the static rendezvous)
#   MASTER_ADDR     host of node 0, reachable from every node (required)
#   MASTER_PORT     free TCP port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE  processes per machine (default: GPUs on this node, or 1 without GPUs)
#   RDZV_BACKEND    c10d (default; elastic, survives restarts) or static
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID or "dsrna")
#   MAX_RESTARTS    restarts after a failure (default 0); the stage resumes from last.pt
#   PYTHON          interpreter (default: python)
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 <module, e.g. dsrna_dist.train> [stage args ...]" >&2
  exit 2
fi
MODULE=$1; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-dsrna}}
if [[ $RDZV_BACKEND == static ]]; then
  RDZV=(--rdzv_backend static --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  RDZV=(--rdzv_backend "$RDZV_BACKEND" --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  "${RDZV[@]}" --max-restarts "${MAX_RESTARTS:-0}" -m "$MODULE" "$@"
