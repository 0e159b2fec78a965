"""How large each robustness term is against the val loss, at initialisation (README numbers).

For a supernet at init (train-mode BN, one synthetic batch) prints, per metric: R, and the
share of the arch gradient its term would take at the paper's gamma = 0.01,
||gamma dR/dalpha|| / ||dL_val/dalpha|| (what ``trade_off: share`` fixes instead); for the
Jacobian metric also the per-example mean_k ||J_k||_1 against what the old same-vector VJP
returned under train-mode BatchNorm; for DSRNA-CB the mean upper-lower gap at each eps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_metric_scale.py                 # PC-DARTS, 5 cells, C=8
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_metric_scale.py --full-darts    # the full DARTS space
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dsrna_dist.config import SupernetConfig
from dsrna_dist.robustness import build_metric, metric_config, metric_forward
from dsrna_dist.robustness.jacobian import jacobian_rows
from dsrna_dist.space.supernet import Supernet


def share(model: Supernet, metric, x: torch.Tensor, y: torch.Tensor, gamma: float = 0.01):
    arch = model.arch_parameters()
    xv = x.detach().requires_grad_(True)
    logits, extra = metric_forward(model, metric, xv, y)
    loss = F.cross_entropy(logits, y)
    r, logs = metric(model, xv, y, logits=logits, extra=extra)
    g_l = torch.cat([g.flatten() for g in torch.autograd.grad(loss, arch, retain_graph=True)]).double()
    g_r = torch.cat([g.flatten() for g in torch.autograd.grad(r, arch, allow_unused=True)]).double()
    return float(r.detach()), float(gamma * g_r.norm() / g_l.norm()), logs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--full-darts", action="store_true", help="no partial channels / edge normalisation")
    ap.add_argument("--eps", type=float, nargs="*", default=[0.03, 1e-4, 1e-6])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = SimpleNamespace(name="b", in_channels=args.in_channels, image_size=args.image_size, num_classes=10,
                           mean=(0.5,) * args.in_channels, std=(0.25,) * args.in_channels)
    pc = 1 if args.full_darts else 4
    model = Supernet(SupernetConfig(init_channels=args.channels, layers=args.layers, nodes=args.nodes,
                                    partial_channels=pc, edge_normalization=pc > 1), info).train()
    x = torch.rand(args.batch, args.in_channels, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    print(f"supernet {'DARTS' if pc == 1 else 'PC-DARTS K=4'} C={args.channels} layers={args.layers} "
          f"nodes={args.nodes}, batch {args.batch}x{args.in_channels}x{args.image_size}^2, init, train-mode BN")

    # the Jacobian metric: per-example rows vs the old same-vector VJP
    xs = x[:8].clone().requires_grad_(True)
    old = jacobian_rows(model(xs), xs, batched=False, create_graph=False)
    print(f"jacobian: same e_k for every example (old VJP): mean_k ||row_k||_1 = "
          f"{float(old.flatten(2).abs().sum(2).mean()):.3g}")
    for name, over in [("jacobian linf paper", dict(name="jacobian", norm="inf", estimator="paper",
                                                      batch_fraction=0.25)),
                       ("jacobian l2 frobenius_sq", dict(name="jacobian", norm="2", estimator="frobenius_sq")),
                       ("jacobian l2 frobenius_sq_fd", dict(name="jacobian", norm="2", estimator="frobenius_sq_fd"))]:
        metric = build_metric(metric_config(**over))
        r, s, logs = share(model, metric, x, y)
        print(f"{name}: R = {r:.3g}, per-example norm = {logs['jacobian_norm']:.3g}, "
              f"grad share at gamma 0.01 = {s:.3g}")
    for eps in args.eps:
        metric = build_metric(metric_config(name="certified", eps=eps, eps_min=1e-12,
                                             eps_rule="log", reduction="min"))
        r, s, logs = share(model, metric, x, y)
        print(f"certified crown-ibp min, eps {eps:g}: R = {r:.3g}, gap = {logs['bound_gap']:.3g}, "
              f"grad share at gamma 0.01 = {s:.3g}")


if __name__ == "__main__":
    main()
