"""Soundness check of a certification run's radii against an attack, per example: a certified
radius must not exceed the smallest eps at which a strong PGD breaks the example (the attack's
upper bound of the true robust radius). For every record of ``--method`` (default crown) it runs
``min_adversarial_eps`` (PGD with the margin loss, ``--steps`` steps, ``--restarts`` restarts,
bisected over eps) at the record's norm on the record's test image, with the run's own checkpoint.
Prints one JSON line per norm: n, violations (radius > PGD's eps; must be 0), and the ratio
PGD eps / radius (min, median, max: how far the certificate sits below the attack). Exit 1 on a
violation, 2 when the run holds no such records.

    OMP_NUM_THREADS=1 python bench/check_radii_vs_pgd.py results/crown200/dsrna_cb_s0 --steps 100 --restarts 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an evaluate run directory with certify.jsonl and config.yaml")
    ap.add_argument("--method", default="crown")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--bisection-steps", type=int, default=14)
    ap.add_argument("--limit", type=int, default=0, help="check the first N records per norm only (0: all)")
    args = ap.parse_args(argv)

    import torch

    from dsrna_dist.attacks.certify import min_adversarial_eps
    from dsrna_dist.config import EvalConfig, load_config
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.engine.io import read_jsonl
    from dsrna_dist.space.network import load_trained

    torch.set_num_threads(1)
    records = [r for r in read_jsonl(args.run / "certify.jsonl", missing_ok=True)
               if r.get("method") == args.method and r.get("radius") is not None]
    if not records:
        print(f"error: {args.run / 'certify.jsonl'}: no {args.method} records", file=sys.stderr)
        return 2
    cfg = load_config(EvalConfig, str(args.run / "config.yaml"))
    model, _, _ = load_trained(str(ROOT / cfg.checkpoint), "cpu")  # an absolute path stays as it is
    arr = load_arrays(cfg.data, "test")
    bad = 0
    for norm in sorted({r["norm"] for r in records}):
        rows = sorted((r for r in records if r["norm"] == norm), key=lambda r: r["index"])
        rows = rows[:args.limit] if args.limit else rows
        idx = torch.tensor([r["index"] for r in rows])
        x, y = arr.images[idx].float() / 255.0, arr.labels[idx]
        radius = torch.tensor([r["radius"] for r in rows], dtype=torch.float64)
        # bisection below 1000x the largest radius (capped at the whole [0, 1] image's reach; its
        # resolution is eps_max / 2^bisection_steps): +inf where PGD fails even there, no violation
        eps_max = min(float(radius.max()) * 1000, 1.0 if norm == "inf" else float(x[0].numel()) ** 0.5)
        pgd = min_adversarial_eps(model, x, y, norm, eps_max=eps_max,
                                  bisection_steps=args.bisection_steps, steps=args.steps,
                                  restarts=args.restarts).double()
        viol = [int(i) for i, r, p in zip(idx, radius, pgd) if r > p]
        bad += len(viol)
        ratio = [float(p / r) for r, p in zip(radius, pgd) if r > 0]
        print(json.dumps({"run": str(args.run), "method": args.method, "norm": norm, "n": len(rows),
                          "violations": len(viol), "violating_indices": viol[:20],
                          "mean_radius": float(radius.mean()),
                          "mean_pgd_eps": float(pgd[pgd.isfinite()].mean()) if pgd.isfinite().any() else None,
                          "pgd_unbroken": int((~pgd.isfinite()).sum()), "eps_max": eps_max,
                          "ratio_pgd_to_radius": {"min": min(ratio), "median": statistics.median(ratio),
                                                  "max": max(ratio)} if ratio else None,
                          "pgd": {"steps": args.steps, "restarts": args.restarts,
                                  "bisection_steps": args.bisection_steps}}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
