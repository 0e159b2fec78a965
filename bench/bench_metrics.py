"""Architecture-step cost of each robustness metric, as a ratio to the plain arch step.

One arch step = forward of the val batch, the objective ``val_loss - gamma * R`` and its
gradient w.r.t. the architecture parameters (``autograd.grad``, as the strategies do), on a
small PC-DARTS supernet. All variants run interleaved in the same process on the same batch;
the median time of each is divided by the median of the no-metric step. A variant whose cost
follows a schedule (``eps_every = n``: upper bounds on every n-th call only) is timed over
blocks of n consecutive steps, so its time is the mean over a whole cycle.

Targets (the lead's brief): Jacobian (l_2, 1 projection) <= 1.5x, CROWN-IBP certified <= 3x.

    .venv/bin/python bench/bench_metrics.py                      # CPU, small supernet
    .venv/bin/python bench/bench_metrics.py --device cuda --batch 128 --channels 16 --layers 8 \
        --image-size 32 --in-channels 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dsrna_dist.config import RobustnessConfig, SupernetConfig, replace
from dsrna_dist.robustness import build_metric, metric_forward
from dsrna_dist.space.supernet import Supernet


def variants() -> List[Tuple[str, Optional[dict], bool]]:
    """(label, robustness overrides or None for no metric, share the val forward's logits)."""
    jac2 = dict(name="jacobian", norm="2", estimator="frobenius_sq", projections=1)
    cb = dict(name="certified", eps_rule="sign")
    return [
        ("none", None, False),
        ("jacobian l2 frobenius_sq P=1", jac2, False),
        ("jacobian l2 frobenius_sq P=1, shared fwd", jac2, True),
        ("jacobian l2 frobenius_sq P=1, 1/4 batch", dict(jac2, batch_fraction=0.25), False),
        ("jacobian l2 frobenius_sq_fd P=1, own fwd", dict(jac2, estimator="frobenius_sq_fd", fd_fused=False), False),
        ("jacobian l2 frobenius_sq_fd P=1, fused fwd", dict(jac2, estimator="frobenius_sq_fd"), False),
        ("jacobian l2 frobenius_sq_fd P=1, own fwd, 1/4 batch",
         dict(jac2, estimator="frobenius_sq_fd", fd_fused=False, batch_fraction=0.25), False),
        ("jacobian l2 frobenius_sq_fd P=1, fused fwd, 1/4 batch",
         dict(jac2, estimator="frobenius_sq_fd", batch_fraction=0.25), False),
        ("jacobian linf paper (K VJPs), 1/4 batch", dict(name="jacobian", norm="inf", batch_fraction=0.25), False),
        ("jacobian l2 paper (K VJPs), 1/4 batch", dict(name="jacobian", norm="2", batch_fraction=0.25), False),
        ("certified ibp", dict(cb, method="ibp"), False),
        ("certified crown-ibp", dict(cb, method="crown-ibp"), False),
        ("certified crown-ibp, eps fixed (no ub)", dict(cb, method="crown-ibp", eps_rule="fixed"), False),
        ("certified crown-ibp, 1/4 batch", dict(cb, method="crown-ibp", batch_fraction=0.25), False),
        ("certified ibp mean_margin", dict(cb, method="ibp", reduction="mean_margin"), False),
        ("certified crown-ibp mean_margin", dict(cb, method="crown-ibp", reduction="mean_margin"), False),
        ("certified crown-ibp mean_margin, 1/4 batch",
         dict(cb, method="crown-ibp", reduction="mean_margin", batch_fraction=0.25), False),
        ("certified crown-ibp mean_margin, 1/4 batch, eps_every 4",
         dict(cb, method="crown-ibp", reduction="mean_margin", batch_fraction=0.25, eps_every=4), False),
        ("certified crown-ibp mean_margin, eps fixed, 1/4 batch",
         dict(cb, method="crown-ibp", reduction="mean_margin", eps_rule="fixed", batch_fraction=0.25), False),
        ("certified ibp mean_margin, 1/4 batch",
         dict(cb, method="ibp", reduction="mean_margin", batch_fraction=0.25), False),
        ("certified crown-ibp mean_margin, own BN pass, 1/4 batch",
         dict(cb, method="crown-ibp", reduction="mean_margin", batch_fraction=0.25, bn_stats="own"), False),
    ]


def make_step(model: Supernet, x: torch.Tensor, y: torch.Tensor, over: Optional[dict],
              share: bool, gamma: float) -> Callable[[], None]:
    metric = None if over is None else build_metric(replace(RobustnessConfig(), **over))
    arch = model.arch_parameters()

    def step() -> None:
        xv = x.detach().requires_grad_(share)
        logits, extra = metric_forward(model, metric, xv, y)  # as SearchStrategy.arch_objective
        obj = F.cross_entropy(logits, y)
        if metric is not None:
            r, _ = metric(model, xv, y, logits=logits if (share or extra is not None) else None, extra=extra)
            obj = obj - gamma * r
        torch.autograd.grad(obj, arch)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0 = leave as is; >1 on a busy machine can be 20x slower)")
    ap.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"),
                    help="model and batch memory format (the search's default, dist.channels_last, is channels_last)")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant labels to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    info = SimpleNamespace(name="bench", in_channels=args.in_channels, image_size=args.image_size,
                           num_classes=10, mean=(0.5,) * args.in_channels, std=(0.25,) * args.in_channels)
    scfg = SupernetConfig(init_channels=args.channels, layers=args.layers, nodes=args.nodes,
                          partial_channels=4, edge_normalization=True)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = Supernet(scfg, info).to(dev, memory_format=fmt).train()
    x = torch.rand(args.batch, args.in_channels, args.image_size, args.image_size, device=dev)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    steps: Dict[str, Callable[[], None]] = {}
    cycle: Dict[str, int] = {}
    for label, over, share in variants():
        if args.only and label != "none" and not any(s in label for s in args.only.split(",")):
            continue
        step = make_step(model, x, y, over, share, gamma=0.01)
        try:
            step()  # warm-up (and: does it run at all?)
        except ImportError as e:
            print(f"skip {label!r}: {e}")
            continue
        steps[label] = step
        cycle[label] = int((over or {}).get("eps_every", 1))

    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for label, step in steps.items():  # interleaved: drifting machine load hits all alike
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(cycle[label]):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - t) / cycle[label])

    base = statistics.median(times["none"])
    print(f"supernet C={args.channels} layers={args.layers} nodes={args.nodes} PC K=4, "
          f"batch {args.batch}x{args.in_channels}x{args.image_size}^2, device {dev}, "
          f"{args.memory_format}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'variant':48s} {'ms':>9s} {'ratio':>7s}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:48s} {1000 * med:9.1f} {med / base:7.2f}x")


if __name__ == "__main__":
    main()
