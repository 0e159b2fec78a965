"""Full-CROWN radius search placement, side by side in one process, on the first n correctly
classified test images of a trained net; one JSON line per image and variant. Variants:
``old`` the fixed 1.5x step of the ninth session; ``chord`` the margin-guided placement of the
tenth (no safeguards); ``safe`` the current one (steps capped 2x while the margin has fallen
< 25%, a failure's regula-falsi point at least a tenth into the bracket); the digit after each
name is the number of full passes.

    OMP_NUM_THREADS=1 python bench/bench_radius_placement.py 5 inf [checkpoint] [variants, e.g. chord3,safe3]
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch

GRID_NET = "results/grid/net/nat/97c7ea0e8a_s0/train/checkpoints/best.pt"


def old_rule(lo, hi, m0, ce, cm, pe, pm, fe, fm, tol):
    """The placement before the tenth session: bisect a bracket, else step up 1.5x (or e^2 down)."""
    both = torch.isfinite(lo) & torch.isfinite(hi)
    return torch.where(both, (lo + hi) / 2, torch.where(torch.isfinite(lo), lo + math.log(1.5), hi - 2.0))


def main() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import dsrna_dist.bounds.certify as C
    from dsrna_dist.bounds import BoundedModel, certified_radius
    from dsrna_dist.config import DataConfig
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.space.network import load_trained

    n = int(sys.argv[1])
    norm = sys.argv[2] if len(sys.argv) > 2 else "inf"
    model, tcfg, _ = load_trained(sys.argv[3] if len(sys.argv) > 3 else GRID_NET, "cpu")
    arr = load_arrays(DataConfig(name=tcfg.data.name), "test")
    x, y = arr.images[:50].float() / 255.0, arr.labels[:50]
    idx = (model(x).argmax(1) == y).nonzero().flatten()[:n].tolist()
    init = 1e-4 if norm == "inf" else 28e-4
    new_rule = C._next_pass
    consts = (C._FALL, C._FLOOR)
    rules = {"old": (old_rule, consts), "chord": (new_rule, (0.0, 0.0)), "safe": (new_rule, consts)}
    wanted = (sys.argv[4] if len(sys.argv) > 4 else "old2,chord2,chord3,safe2,safe3").split(",")
    for i in idx:
        for v in wanted:
            name, passes = v[:-1], int(v[-1])
            rule, (C._FALL, C._FLOOR) = rules[name]
            C._next_pass = rule  # the search looks the rule and its constants up at call time
            t0 = time.process_time()
            r, f = certified_radius(BoundedModel(model), x[i:i + 1], y[i:i + 1], norm, "crown", steps=15,
                                    rel_tol=1e-2, crown_passes=passes, eps_init=init, bracket=True)
            print(json.dumps({"index": i, "rule": name, "passes": passes, "norm": norm, "radius": float(r[0]),
                              "failed_at": float(f[0]), "cpu_s": round(time.process_time() - t0, 1)}), flush=True)
    C._next_pass = new_rule
    C._FALL, C._FLOOR = consts


if __name__ == "__main__":
    main()
