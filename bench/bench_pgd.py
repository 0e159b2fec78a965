"""PGD with per-example early exit (attacks/pgd.py steps only the examples it has not broken)
against the plain loop that steps every example every step, side by side in one run: process
CPU time and whether the two give the same adversarial examples.

    OMP_NUM_THREADS=1 python bench/bench_pgd.py --checkpoint runs/<train>/checkpoints/best.pt \
        --n 200 --steps 100

The saving depends on how fast examples break: on a natural network nearly all break in a
few steps, on a PGD-trained one the unbroken ones are stepped to the end either way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsrna_dist.attacks import build_attack  # noqa: E402
from dsrna_dist.attacks.base import input_grad, project  # noqa: E402
from dsrna_dist.config import AttackConfig  # noqa: E402


def plain(atk, model, x, y, idx):
    """Every example stepped every step (the loop before the early exit; one restart)."""
    x_adv = atk.random_start(x, idx, 0)
    hit, found = torch.zeros(len(x), dtype=torch.bool), x.clone()
    for _ in range(atk.cfg.steps):
        g, logits = input_grad(model, x_adv, y, atk.cfg.loss)
        new = (logits.argmax(1) != y) & ~hit
        found[new], hit = x_adv[new], hit | new
        x_adv = project(atk.step(x_adv, g), x, atk.eps, atk.norm)
    new = (model(x_adv).argmax(1) != y) & ~hit
    found[new], hit = x_adv[new], hit | new
    found[~hit] = x_adv[~hit]
    return found


def main() -> int:
    from dsrna_dist.config import load_config, EvalConfig
    from dsrna_dist.evaluate import TestSet
    from dsrna_dist.space.network import load_trained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--step-size", type=float, default=0.01)
    args = ap.parse_args()
    model, tcfg, _ = load_trained(args.checkpoint, "cpu")
    data = TestSet(load_config(EvalConfig, overrides={"data.name": tcfg.data.name}).data)
    idx = list(range(args.n))
    x, y = data.x(idx, torch.device("cpu")), data.y(idx, torch.device("cpu"))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y, idx = x[ok], y[ok], [i for i, k in zip(idx, ok.tolist()) if k]
    atk = build_attack(AttackConfig(name="pgd", eps=args.eps, step_size=args.step_size, steps=args.steps), seed=0)
    t0 = time.process_time()
    with torch.no_grad():
        a = atk.perturb(model, x, y, idx)
    t_fast = time.process_time() - t0
    t0 = time.process_time()
    b = plain(atk, model, x, y, idx)
    t_plain = time.process_time() - t0
    with torch.no_grad():
        fa, fb = model(a).argmax(1) != y, model(b).argmax(1) != y
    print(f"{len(x)} correctly classified of {args.n}; PGD-{args.steps} l_inf {args.eps}: robust accuracy "
          f"{100 * (1 - fa.float().mean()):.1f}% (early exit) vs {100 * (1 - fb.float().mean()):.1f}% (plain); "
          f"same fooled set: {bool(torch.equal(fa, fb))}; max |diff| {float((a - b).abs().max()):.2e}")
    print(f"CPU s: early exit {t_fast:.1f}, plain {t_plain:.1f}, ratio plain/early {t_plain / max(t_fast, 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
