"""CPU memory layout and the strided dil_conv rewrite, side by side in one run, per checkpoint.

Four variants of the same trained network: contiguous or channels_last layout, each with the
stride-2 ``dil_conv`` as the native ``nn.Conv2d`` or as ``SubsampledConv2d`` (subsample, then
a stride-1 conv: space/layers.py). Per variant: process CPU time of one attack step (input
gradient of a batch) and of one train step (forward + backward with parameter gradients, BN in
train mode), and, for the old default (contiguous, native) and the new one (channels_last,
rewrite), PGD-20 on the first test images: robust accuracy and CPU time, so the speed-up is
shown to leave what an attack finds unchanged up to float rounding.

    OMP_NUM_THREADS=1 python bench/bench_cpu_layout.py --checkpoints results/grid/net/adv/*_s0/train/checkpoints/best.pt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsrna_dist.attacks import build_attack  # noqa: E402
from dsrna_dist.attacks.base import input_grad  # noqa: E402
from dsrna_dist.config import AttackConfig, EvalConfig, load_config  # noqa: E402
from dsrna_dist.space.layers import SubsampledConv2d  # noqa: E402


def cpu_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: first-call kernel selection
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def set_variant(model: nn.Module, layout: torch.memory_format, rewrite: bool) -> int:
    """Switch every strided dil_conv between the two classes (same parameters); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and SubsampledConv2d.applies(m.kernel_size[0], m.stride[0], m.padding[0],
                                                                  m.dilation[0]):
            m.__class__ = SubsampledConv2d if rewrite else nn.Conv2d
            n += 1
    model.to(memory_format=layout)
    return n


def main() -> int:
    from dsrna_dist.data import dataset_info
    from dsrna_dist.evaluate import TestSet
    from dsrna_dist.space.network import load_trained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=500, help="attack batch (the grid's eval_batch_size)")
    ap.add_argument("--train-batch", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pgd-n", type=int, default=200, help="test images for the PGD-20 check (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = {"contiguous": (torch.contiguous_format, False), "contiguous+rewrite": (torch.contiguous_format, True),
                "channels_last": (torch.channels_last, False), "channels_last+rewrite": (torch.channels_last, True)}
    print("| network | strided dil_convs | " + " | ".join(f"{v}: attack / train step (CPU s)" for v in variants)
          + " | speed-up attack / train | PGD-20 robust acc old / new | PGD-20 CPU s old / new |")
    print("|---" * (6 + len(variants)) + "|")
    for path in args.checkpoints:
        model, tcfg, _ = load_trained(path, "cpu")
        g = torch.Generator().manual_seed(0)
        info = dataset_info(tcfg.data)
        x = torch.rand(args.batch, info.in_channels, info.image_size, info.image_size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        xt, yt = x[:args.train_batch], y[:args.train_batch]

        def train_step() -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(xt)
            F.cross_entropy(out[0] if isinstance(out, tuple) else out, yt).backward()
            model.eval()

        trained = {k: v.clone() for k, v in model.state_dict().items()}
        res: Dict[str, tuple] = {}
        n_dil = 0
        for name, (layout, rewrite) in variants.items():
            n_dil = set_variant(model, layout, rewrite)
            xl = x.contiguous(memory_format=layout)
            res[name] = (cpu_s(lambda: input_grad(model, xl, y), args.reps), cpu_s(train_step, args.reps))
        model.load_state_dict(trained)  # the train steps moved the BN running statistics
        (a0, t0), (a1, t1) = res["contiguous"], res["channels_last+rewrite"]
        acc, secs = ["-", "-"], ["-", "-"]
        if args.pgd_n:
            data = TestSet(load_config(EvalConfig, overrides={"data.name": tcfg.data.name}).data)
            idx = list(range(args.pgd_n))
            xs, ys = data.x(idx, torch.device("cpu")), data.y(idx, torch.device("cpu"))
            for k, name in enumerate(("contiguous", "channels_last+rewrite")):
                set_variant(model, *variants[name])
                atk = build_attack(AttackConfig(name="pgd", eps=0.1, step_size=0.01, steps=20), seed=0)
                s0 = time.process_time()
                with torch.no_grad():
                    xa = atk.perturb(model, xs, ys, idx)
                    acc[k] = f"{100 * (model(xa).argmax(1) == ys).float().mean():.1f}%"
                secs[k] = f"{time.process_time() - s0:.1f}"
        cells = " | ".join(f"{a:.2f} / {t:.2f}" for a, t in res.values())
        print(f"| {Path(path).parts[-4]} | {n_dil} | {cells} | {a0 / a1:.2f}x / {t0 / t1:.2f}x | "
              f"{acc[0]} / {acc[1]} | {secs[0]} / {secs[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
