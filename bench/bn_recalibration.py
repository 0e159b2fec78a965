"""How much of a trained net's test accuracy is its BatchNorm running statistics?

    python bench/bn_recalibration.py results/grid/net/nat/*/train/checkpoints/last.pt

For each train checkpoint: test top-1 (all test images) as saved, then with every BN's running
mean / var re-estimated as a plain average (momentum None, "precise BN") over ``--batches``
batches of training images in train mode, weights untouched (train's ``precise_bn_batches``
does the same before every evaluation). A large gain says the saved
statistics (an EMA, momentum 0.1, over the last few dozen steps of a short run) do not match
the final weights, so retrain-to-retrain spread in test accuracy is partly BN-statistics noise.
Training images only (never test); they include the held-out validation split, which is
unlabelled use here. No file is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsrna_dist.data.base import load_arrays  # noqa: E402
from dsrna_dist.data.errors import DataError  # noqa: E402
from dsrna_dist.engine.errors import CheckpointError  # noqa: E402
from dsrna_dist.space.network import load_trained  # noqa: E402
from dsrna_dist.training.precise_bn import bn_layers, precise_bn  # noqa: E402


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    hit = sum(int((model(images[i:i + bs].float() / 255).argmax(1) == labels[i:i + bs]).sum())
              for i in range(0, len(labels), bs))
    return 100.0 * hit / len(labels)


def recalibrate(model: nn.Module, images: torch.Tensor, batches: int, batch_size: int, seed: int) -> int:
    """Re-estimate every BN's running statistics over ``batches`` seeded batches (train's precise BN)."""
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    chunks = (perm[k * batch_size:(k + 1) * batch_size] for k in range(batches))
    precise_bn(model, (images[idx].float() / 255 for idx in chunks if len(idx)))
    model.eval()
    return len(bn_layers(model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| checkpoint | BNs | test top-1 as saved | BN re-estimated | gain |\n|---|---|---|---|---|")
    for path in args.checkpoints:
        try:
            model, cfg, _ = load_trained(path)
            test, train = load_arrays(cfg.data, "test"), load_arrays(cfg.data, "train")
        except (CheckpointError, DataError) as e:
            print(f"bn_recalibration: {e}", file=sys.stderr)
            return 2
        before = top1(model, test.images, test.labels)
        n = recalibrate(model, train.images, args.batches, args.batch_size, args.seed)
        after = top1(model, test.images, test.labels)
        print(f"| `{path}` | {n} | {before:.2f} | {after:.2f} | {after - before:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
