#!/usr/bin/env bash
# All devices of one machine with torchrun.
#   launch/torchrun_single_node.sh dsrna_dist.train --config=configs/train/cifar10.yaml [--key=value ...]
# Environment (all optional):
#   NPROC_PER_NODE  processes (default: number of GPUs, or 2 on a CPU-only machine -> gloo)
#   MAX_RESTARTS    torchrun restarts after a failure (default 0); resumes from last.pt
#   PYTHON          interpreter (default: python)
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 <module, e.g. dsrna_dist.train> [stage args ...]" >&2
  exit 2
fi
MODULE=$1; shift
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec "$PYTHON" -m torch.distributed.run --standalone \
  --nproc_per_node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}" \
  -m "$MODULE" "$@"
