"""Certification throughput and peak memory (what evaluate.py's certify phase costs).

Each (method, norm, untargeted | random-target) case runs ``certify_batch``-style bisection
(dsrna_dist.bounds.certified_radius, ``--steps`` log-space steps) in its own subprocess, so peak
memory (RSS on CPU, CUDA peak on GPU) is per case, on the same derived DARTS_V2 network and the
same inputs. For scale, the same examples also go through PGD-20 (attack side). The table
prints examples/s, peak memory and the mean radius, with ratios to IBP side by side.

    python bench/bench_certify.py                       # quick default (5 cells, C=4, 16x16x1)
    python bench/bench_certify.py --image-size 32 --in-channels 3 --init-channels 16 --layers 8 \
        --methods ibp,crown-ibp,crown --batch 32 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types


def _build(args):
    import torch
    from dsrna_dist.config import NetworkConfig
    from dsrna_dist.space.network import build_network

    torch.manual_seed(0)
    info = types.SimpleNamespace(name="synthetic", image_size=args.image_size, in_channels=args.in_channels,
                                 num_classes=10, mean=(0.5,) * args.in_channels, std=(0.25,) * args.in_channels)
    cfg = NetworkConfig(genotype="DARTS_V2", init_channels=args.init_channels, layers=args.layers, auxiliary=False)
    return build_network(cfg, "DARTS_V2", info).to(args.device).eval()


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = _build(args)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, args.in_channels, args.image_size, args.image_size, generator=g).to(args.device)
    with torch.no_grad():
        y = model(x).argmax(1)   # certify what the model predicts: every example "correct"
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    method, norm, kind = args.case.split(":")
    t0 = time.perf_counter()
    if method == "pgd":
        from dsrna_dist.attacks import build_attack
        from dsrna_dist.config import AttackConfig

        eps = 8 / 255 if norm == "inf" else 0.5
        atk = build_attack(AttackConfig(name="pgd", norm=norm, eps=eps, step_size=eps / 4, steps=20))
        for _ in range(args.repeats):
            atk(model, x, y)
        mean = float("nan")
    else:
        from dsrna_dist.bounds.evaluation import certify_batch

        for _ in range(args.repeats):
            recs = certify_batch(model, x, y, list(range(len(y))), methods=[method], norms=[norm],
                                 steps=args.steps, eps_init=0.05, random_target=False, seed=0, num_classes=10) \
                if kind == "untargeted" else None
            if kind == "target":
                from dsrna_dist.bounds.evaluation import random_targets
                from dsrna_dist.bounds import certified_radius

                tgt = random_targets(y, 10, 0, list(range(len(y))))
                with torch.no_grad():
                    r = certified_radius(model, x, y, norm, method, args.steps, 0.05, target=tgt)
                recs = [{"radius": float(v)} for v in r]
        mean = sum(r["radius"] for r in recs) / len(recs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    print(json.dumps({"case": args.case, "ex_per_s": args.batch * args.repeats / dt, "peak_mb": peak,
                      "mean_radius": mean}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="ibp,crown-ibp", help="comma list of ibp, crown-ibp, crown")
    ap.add_argument("--norms", default="inf,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15, help="bisection steps (CNN-Cert: 15)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--init-channels", type=int, default=4)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return child(args)
    cases = [f"{m}:{n}:{k}" for n in args.norms.split(",") for m in args.methods.split(",")
             for k in ("untargeted", "target")] + [f"pgd:{n}:attack" for n in args.norms.split(",")]
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", case]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if r.returncode != 0:
            print(f"{case}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"DARTS_V2 C={args.init_channels} layers={args.layers} {args.in_channels}x{args.image_size}x{args.image_size}, "
          f"batch {args.batch}, {args.steps} bisection steps, device {args.device}")
    print(f"{'case':<28}{'ex/s':>10}{'x IBP':>8}{'peak MB':>10}{'x IBP':>8}{'mean radius':>14}")
    for row in rows:
        m, n, k = row["case"].split(":")
        base = next((b for b in rows if b["case"] == f"ibp:{n}:{k if k != 'attack' else 'untargeted'}"), None)
        sp = f"{row['ex_per_s'] / base['ex_per_s']:.2f}" if base else "-"
        mem = f"{row['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        print(f"{row['case']:<28}{row['ex_per_s']:>10.2f}{sp:>8}{row['peak_mb']:>10.0f}{mem:>8}{row['mean_radius']:>14.5g}")


if __name__ == "__main__":
    main()
