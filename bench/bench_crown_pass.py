"""Cost of ONE full-CROWN margin pass (every intermediate bound by backward passes) on a trained
network, per engine setting, at a fixed eps: process CPU time, the neurons IBP leaves loose
(rows of the intermediate backward passes) and the margin lower bound. One JSON line per setting.

    OMP_NUM_THREADS=1 python bench/bench_crown_pass.py --checkpoint runs/<train>/checkpoints/best.pt \
        --eps 1e-4 --settings "exact;stages=1,2,4;no_pool"
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _settings(spec: str):
    out = []
    for s in spec.split(";"):
        kw = {}
        if s.startswith("stages="):
            kw["crown_stages"] = tuple(int(v) for v in s.split("=", 1)[1].split(","))
        elif s.startswith("depth="):
            kw["crown_depth"] = int(s.split("=", 1)[1])
        elif s == "no_pool":
            kw["crown_pool_inputs"] = False
        elif s.startswith("probe="):  # probe=P or probe=P,tol
            v = s.split("=", 1)[1].split(",")
            kw["crown_probe_rows"] = int(v[0])
            if len(v) > 1:
                kw["crown_probe_tol"] = float(v[1])
        elif s.startswith("mem="):
            kw["max_memory_mb"] = float(s.split("=", 1)[1])
        elif s == "no_fwd":
            kw["crown_forward"] = False
        elif s != "exact":
            raise SystemExit(f"--settings: unknown {s!r} (exact, stages=a,b, depth=d, no_pool, no_fwd, probe=P[,tol], mem=MB)")
        out.append((s, kw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--eps", type=float, default=1e-4)
    ap.add_argument("--norm", default="inf")
    ap.add_argument("--index", type=int, default=0, help="test image index")
    ap.add_argument("--settings", default="exact", help="';'-separated: exact (forward pre-pass on, the "
                    "default), no_fwd (the backward passes on every IBP-loose row), stages=a,b, depth=d, no_pool")
    ap.add_argument("--method", default="crown", help="crown or crown-forward")
    ap.add_argument("--profile", action="store_true", help="per relaxed node: backward rows, CPU s, mean width "
                    "of the (re-anchored) forward bounds and of the final box (one intermediate-bound pass)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from dsrna_dist.bounds import BoundedModel
    from dsrna_dist.config import DataConfig
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.space.network import load_trained

    model, tcfg, _ = load_trained(args.checkpoint, "cpu")
    arr = load_arrays(DataConfig(name=tcfg.data.name), "test")
    x = arr.images[args.index:args.index + 1].float() / 255.0
    y = arr.labels[args.index:args.index + 1]
    for name, kw in _settings(args.settings):
        bm = BoundedModel(model, **kw)
        if args.profile:
            t0 = time.process_time()
            run = bm._propagate(x, torch.full((1,), args.eps), args.norm, args.method, 0.0, 1.0)
            total = time.process_time() - t0
            for n in bm.nodes:
                if n not in bm.pre_act:
                    continue
                fc, box = run.fwd_conc.get(n), run.bnd[n]
                print(json.dumps({"setting": name, "node": n.name, "rows": run.rows.get(n.name, 0),
                                  "cpu_s": round(run.times.get(n.name, 0.0), 2),
                                  "relu_only": n in bm.relu_only_pre_act,
                                  "fwd_width": None if fc is None else float((fc.upper - fc.lower).mean()),
                                  "final_width": float((box.upper - box.lower).mean())}), flush=True)
            print(json.dumps({"setting": name, "intermediate_pass_cpu_s": total}), flush=True)
            continue
        keep: dict = {}
        t0 = time.process_time()
        m = bm.margin_lower_bound(x, y, args.eps, args.norm, args.method, keep=keep)
        dt = time.process_time() - t0
        loose = sum(int(((b.lower < 0) & (b.upper > 0)).sum()) for n, b in keep.items() if n in bm.relu_only_pre_act)
        print(json.dumps({"setting": name, "method": args.method, "eps": args.eps, "norm": args.norm, "index": args.index, "cpu_s": dt,
                          "margin_min": float(m.scatter(1, y.view(-1, 1), math.inf).min()),
                          "unstable_relu_inputs_after": loose,
                          "backward_rows": sum(getattr(bm, "last_run_rows", {}).values()),
                          "skipped_rows": sum(getattr(bm, "last_run_skipped", {}).values()),
                          "backward_rows_per_node": {k: (v, round(getattr(bm, "last_run_times", {}).get(k, 0.0), 2))
                                                     for k, v in getattr(bm, "last_run_rows", {}).items()}}),
              flush=True)


if __name__ == "__main__":
    main()
