"""Full-CROWN margin curve of one test image: the margin lower bound (min over j != y) from one
fresh full pass per eps, the quantity the radius search's pass placement extrapolates
(BENCHMARKS.md "Radius search placement"). One JSON line per eps; eps 0 is the clean margin.

    OMP_NUM_THREADS=1 python bench/margin_curve.py inf 0 1e-4,2e-4,4e-4 [checkpoint]
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch

GRID_NET = "results/grid/net/nat/97c7ea0e8a_s0/train/checkpoints/best.pt"


def main() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from dsrna_dist.bounds import BoundedModel
    from dsrna_dist.config import DataConfig
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.space.network import load_trained

    norm, i = sys.argv[1], int(sys.argv[2])
    epss = [float(v) for v in sys.argv[3].split(",")]
    model, tcfg, _ = load_trained(sys.argv[4] if len(sys.argv) > 4 else GRID_NET, "cpu")
    arr = load_arrays(DataConfig(name=tcfg.data.name), "test")
    x, y = arr.images[i:i + 1].float() / 255.0, arr.labels[i:i + 1]
    logits = model(x)[0]
    m0 = float((logits[y] - logits).scatter(0, y, math.inf).min())
    print(json.dumps({"index": i, "eps": 0.0, "margin": m0, "correct": int(logits.argmax()) == int(y)}), flush=True)
    for e in epss:
        t0 = time.process_time()
        m = BoundedModel(model).margin_lower_bound(x, y, e, norm, "crown")
        print(json.dumps({"index": i, "eps": e, "margin": float(m.scatter(1, y.view(-1, 1), math.inf).min()),
                          "cpu_s": round(time.process_time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
