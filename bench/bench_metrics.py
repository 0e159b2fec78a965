"""Architecture-step cost of each robustness metric, as a ratio to the plain arch step.

One arch step = forward of the val batch, the objective's two terms ``val_loss`` and ``R`` and
their gradients w.r.t. the architecture parameters, taken separately (two ``autograd.grad``
calls, as the strategies do since the trade-off needs both norms: ``combine_arch_grads``), on a
PC-DARTS supernet. All variants run interleaved in the same process on the same batch;
the median time of each (process CPU time on CPU, wall time on CUDA) is divided by the median
of the no-metric step. A variant whose cost
follows a schedule (``eps_every = n``: upper bounds on every n-th call only) is timed over
blocks of n consecutive steps, so its time is the mean over a whole cycle.

Targets (the lead's brief): Jacobian (l_2, 1 projection) <= 1.5x, CROWN-IBP certified <= 3x.

``--eps-trajectory N`` first runs DSRNA-CB's eps rule (``eps_rule: log``, per-class min,
CROWN-IBP, from ``--eps`` = 0.03) for N calls on the benchmark batch, printing (step, eps, gap)
per call and writing them to ``--trajectory-out`` (JSON lines); the certified variants are then
timed at the eps it ended on. One target per ``--eps-target`` (the first sets the timed eps).

    .venv/bin/python bench/bench_metrics.py                      # CPU, small supernet
    .venv/bin/python bench/bench_metrics.py --device cuda --batch 128 --channels 16 --layers 8 \
        --image-size 32 --in-channels 3
    # the paper's CIFAR-10 supernet (3 nodes), eps rule trajectory, then the costs at its eps
    .venv/bin/python bench/bench_metrics.py --batch 32 --channels 16 --layers 8 --nodes 3 \
        --image-size 32 --in-channels 3 --repeats 2 --eps-trajectory 12 --only "certified,paper,none"
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dsrna_dist.config import SupernetConfig
from dsrna_dist.robustness import build_metric, metric_config, metric_forward
from dsrna_dist.space.supernet import Supernet


def variants() -> List[Tuple[str, Optional[dict], bool]]:
    """(label, robustness overrides or None for no metric, share the val forward's logits)."""
    jac2 = dict(name="jacobian", norm="2", estimator="frobenius_sq", projections=1)
    cb = dict(name="certified", eps_rule="log", eps_min=1e-12)
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
        ("jacobian linf paper (K VJPs, per-example rows), 1/4 batch",
         dict(name="jacobian", norm="inf", batch_fraction=0.25), False),
        ("jacobian l2 paper (K VJPs, per-example rows), 1/4 batch",
         dict(name="jacobian", norm="2", batch_fraction=0.25), False),
        ("jacobian linf paper (K VJPs, per-example rows), 1/8 batch",
         dict(name="jacobian", norm="inf", batch_fraction=0.125), False),
        ("certified ibp", dict(cb, method="ibp"), False),
        ("certified crown-ibp", dict(cb, method="crown-ibp"), False),
        ("certified crown-ibp, eps fixed (no ub)", dict(cb, method="crown-ibp", eps_rule="fixed"), False),
        ("certified crown-ibp, 1/4 batch", dict(cb, method="crown-ibp", batch_fraction=0.25), False),
        ("certified crown-ibp min, 1/4 batch, eps_every 4",
         dict(cb, method="crown-ibp", batch_fraction=0.25, eps_every=4), False),
        ("certified crown-ibp min, 1/4 batch, eps fixed",
         dict(cb, method="crown-ibp", batch_fraction=0.25, eps_rule="fixed"), False),
        ("certified crown-ibp min, 1/8 batch, eps_every 4",
         dict(cb, method="crown-ibp", batch_fraction=0.125, eps_every=4), False),
        ("certified crown-ibp min, 1/4 batch, eps_every 4, max_pool cheap",
         dict(cb, method="crown-ibp", batch_fraction=0.25, eps_every=4, max_pool="cheap"), False),
        ("certified crown-ibp min, 1/8 batch, eps_every 4, max_pool cheap",
         dict(cb, method="crown-ibp", batch_fraction=0.125, eps_every=4, max_pool="cheap"), False),
        ("certified ibp min, 1/4 batch, eps_every 4",
         dict(cb, method="ibp", batch_fraction=0.25, eps_every=4), False),
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
              share: bool, eps: float) -> Callable[[], None]:
    over = None if over is None else dict(over, eps=eps) if over.get("name") == "certified" else over
    metric = None if over is None else build_metric(metric_config(**over))
    arch = model.arch_parameters()

    def step() -> None:
        xv = x.detach().requires_grad_(share)
        logits, extra = metric_forward(model, metric, xv, y)  # as SearchStrategy.arch_terms
        loss = F.cross_entropy(logits, y)
        if metric is None:
            torch.autograd.grad(loss, arch)
            return
        r, _ = metric(model, xv, y, logits=logits if (share or extra is not None) else None, extra=extra)
        torch.autograd.grad(loss, arch, retain_graph=True)  # the two gradients the trade-off needs
        torch.autograd.grad(r, arch, allow_unused=True)
        if metric.name == "certified":
            metric.eps = eps  # every timed call at the same radius (the rule would move it)

    return step


def eps_trajectory(model: Supernet, x: torch.Tensor, y: torch.Tensor, steps: int, eps0: float,
                   target: float, eps_min: float, out: Optional[str]) -> float:
    """DSRNA-CB's eps rule (log) for ``steps`` calls on this batch; returns the last eps."""
    metric = build_metric(metric_config(name="certified", method="crown-ibp", reduction="min",
                                         eps=eps0, eps_rule="log", eps_target_gap=target, eps_min=eps_min))
    rows = []
    for t in range(steps):
        c0 = time.process_time()
        with metric.forward_context(model), torch.no_grad():
            model(x)
        with torch.no_grad():
            _, logs = metric(model, x, y)
        rows.append({"step": t, "eps": logs["eps"], "gap": logs["bound_gap"], "target": target,
                     "eps_next": metric.eps, "cpu_s": round(time.process_time() - c0, 2)})
        print(f"eps rule (target {target:g}): step {t:3d}  eps {logs['eps']:.4e}  gap {logs['bound_gap']:.4e}"
              f"  log10(gap/target) {math.log10(max(logs['bound_gap'], 1e-300) / target):+.2f}", flush=True)
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return metric.eps


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
    ap.add_argument("--only", default="", help="substrings of variant labels to run, separated by ',' (or by ';' if any)")
    ap.add_argument("--eps", type=float, default=0.03, help="certified variants' eps (the trajectory's start)")
    ap.add_argument("--eps-trajectory", type=int, default=0, help="run the eps rule this many calls first")
    ap.add_argument("--eps-target", type=float, action="append", default=None,
                    help="eps_target_gap of the trajectory (repeatable; the first sets the timed eps); default 1")
    ap.add_argument("--eps-min", type=float, default=1e-6, help="eps_min of the trajectory (the configs' floor)")
    ap.add_argument("--trajectory-out", default="", help="JSON-lines file for the trajectory rows")
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

    eps = args.eps
    if args.eps_trajectory:
        timed = None
        for target in args.eps_target or [1.0]:
            last = eps_trajectory(model, x, y, args.eps_trajectory, args.eps, target, args.eps_min,
                                  args.trajectory_out)
            timed = last if timed is None else timed
        eps = timed
        print(f"certified variants timed at eps {eps:.4e}")

    sep = ";" if ";" in args.only else ","  # labels contain commas: ';' separates substrings then
    steps: Dict[str, Callable[[], None]] = {}
    cycle: Dict[str, int] = {}
    for label, over, share in variants():
        if args.only and label != "none" and not any(s in label for s in args.only.split(sep)):
            continue
        step = make_step(model, x, y, over, share, eps)
        try:
            step()  # warm-up (and: does it run at all?)
        except ImportError as e:
            print(f"skip {label!r}: {e}")
            continue
        steps[label] = step
        cycle[label] = int((over or {}).get("eps_every", 1))

    # CPU: this process's CPU time (one thread), which other processes on a shared machine do
    # not inflate; CUDA: wall time between synchronisations
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for label, step in steps.items():  # interleaved: drifting machine load hits all alike
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = clock()
            for _ in range(cycle[label]):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[label].append((clock() - t) / cycle[label])

    base = statistics.median(times["none"])
    print(f"supernet C={args.channels} layers={args.layers} nodes={args.nodes} PC K=4, "
          f"batch {args.batch}x{args.in_channels}x{args.image_size}^2, device {dev}, "
          f"{args.memory_format}, threads {torch.get_num_threads()}, median of {args.repeats}, "
          f"certified at eps {eps:.3g}, {'wall' if dev.type == 'cuda' else 'process CPU'} time")
    print(f"{'variant':62s} {'ms':>9s} {'ratio':>7s}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:62s} {1000 * med:9.1f} {med / base:7.2f}x")


if __name__ == "__main__":
    main()
