"""Certified radii of a trained network on its first N correctly classified test examples,
before and after the tightening of issue 16 (l_2 ball, merged ReLUs, folded margin, CNN-Cert
max pool), per method and norm, with process CPU time per example; then full CROWN on as many
examples as ``--crown-budget-s`` CPU seconds allow (warm-started from CROWN-IBP, capped by the
smallest eps PGD breaks). One JSON line per result on stdout.

    OMP_NUM_THREADS=1 python bench/bench_radii.py --checkpoint runs/<train>/checkpoints/last.pt \
        --n 200 --rel-tol 1e-3 --crown-budget-s 900
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _data(ck: str, n: int):
    from dsrna_dist.config import DataConfig
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.space.network import load_trained

    model, tcfg, _ = load_trained(ck, "cpu")
    model.eval()
    arr = load_arrays(DataConfig(name=tcfg.data.name), "test")
    x = arr.images[: 2 * n + 100].float() / 255.0
    y = arr.labels[: 2 * n + 100]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    idx = ok.nonzero().flatten()[:n]
    return model, x[idx], y[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rel-tol", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=40, help="most probes per example")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--methods", default="ibp,crown-ibp")
    ap.add_argument("--crown-budget-s", type=float, default=0.0)
    ap.add_argument("--crown-passes", type=int, default=3, help="full-CROWN passes per example (0: exact search)")
    ap.add_argument("--crown-eps-init", type=float, default=1e-4, help="first full-CROWN eps without a bracket")
    ap.add_argument("--no-pool-inputs", action="store_true", help="max-pool inputs keep IBP boxes (faster, looser)")
    ap.add_argument("--norms", default="inf,2", help="norms of the full-CROWN part")
    ap.add_argument("--no-forward", action="store_true", help="full CROWN without the forward-mode pre-pass "
                    "(backward passes on every IBP-loose row: the engine before issue 16's pre-pass)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dsrna_dist.bounds.evaluation import min_adversarial_eps
    from dsrna_dist.bounds import BoundedModel, certified_radius

    model, x, y = _data(args.checkpoint, args.n)
    variants = {"before": BoundedModel(model, merge_relus=False, max_pool="cheap", l2_ball=False, fold_spec=False),
                "after": BoundedModel(model)}
    crown_ibp = {}
    for norm in ("inf", "2"):
        for method in args.methods.split(","):
            for name, bm in variants.items():
                t0 = time.process_time()
                r = torch.cat([certified_radius(bm, x[i:i + args.batch], y[i:i + args.batch], norm, method,
                                                steps=args.steps, rel_tol=args.rel_tol)
                               for i in range(0, len(y), args.batch)])
                dt = time.process_time() - t0
                if name == "after" and method == "crown-ibp":
                    crown_ibp[norm] = r
                print(json.dumps({"variant": name, "method": method, "norm": norm, "n": len(y),
                                  "mean_radius": float(r.mean()), "median_radius": float(r.median()),
                                  "nonzero": int((r > 0).sum()), "cpu_s_per_example": dt / len(y)}), flush=True)
    if args.crown_budget_s <= 0:
        return
    bm = BoundedModel(model, crown_pool_inputs=not args.no_pool_inputs, crown_forward=not args.no_forward)
    for norm in args.norms.split(","):
        spent, radii, times = 0.0, [], []
        for i in range(len(y)):
            if spent >= args.crown_budget_s / 2:
                break
            t0 = time.process_time()
            xi, yi = x[i:i + 1], y[i:i + 1]
            adv = min_adversarial_eps(model, xi, yi, norm, eps_max=1.0 if norm == "inf" else 10.0,
                                      bisection_steps=10, steps=20)
            t1 = time.process_time()
            lower = crown_ibp.get(norm)
            r = certified_radius(bm, xi, yi, norm, "crown", steps=args.steps, rel_tol=args.rel_tol,
                                 lower=lower[i:i + 1] if lower is not None else None, upper=adv,
                                 crown_passes=args.crown_passes,
                                 eps_init=args.crown_eps_init * (28.0 if norm == "2" else 1.0))
            dt = time.process_time() - t0
            spent += dt
            radii.append(float(r[0]))
            times.append(dt)
            print(json.dumps({"crown_example": i, "norm": norm, "radius": float(r[0]), "pgd_eps": float(adv[0]),
                              "crown_passes": args.crown_passes, "pool_inputs": not args.no_pool_inputs,
                              "forward_prepass": not args.no_forward,
                              "crown_ibp_radius": float(lower[i]) if lower is not None else None,
                              "cpu_s": dt, "cpu_s_pgd": t1 - t0}), flush=True)
        if radii:
            print(json.dumps({"variant": "after", "method": "crown", "norm": norm, "n": len(radii),
                              "mean_radius": sum(radii) / len(radii), "cpu_s_per_example": sum(times) / len(times)}),
                  flush=True)


if __name__ == "__main__":
    main()
