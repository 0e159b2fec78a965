"""Precise BatchNorm: re-estimate the running statistics as a plain average before evaluation.

Why: BN saves an EMA (momentum 0.1) of the batch statistics of the last few dozen steps, taken
while the weights still moved. After a short run that EMA can sit far from what the final
weights produce: retraining the same natural ``fmnist_small`` net on another CPU (float rounding
only) moved test top-1 by up to 8 points with the same training curve, and re-estimating the
statistics alone gave the points back (RESULTS.md claim 2, ``bench/bn_recalibration.py``). The
fix is the one of Wu & Johnson 2021 ("Rethinking BatchNorm", the pycls / fvcore / timm
``precise_bn``): with the weights fixed, average the per-batch mean and (unbiased) variance over
many training batches, then evaluate and checkpoint with those. Training itself keeps its own
EMA (``bn_stats`` / ``load_bn_stats``: train puts it back after the checkpoint and stores it
beside the weights for a resume), because a regime may read the running statistics while it
trains: PGD-AT and TRADES attack in eval mode.

Here the batches are *unaugmented* training images (the distribution the evaluation sees),
never the held-out validation split, drawn as a seeded subset so that the same positions are
used every epoch, on every rank and after a resume. The average over ranks is one all-reduce.
No RNG is consumed (no shuffle, no augmentation, no drop-path) and training continues from the EMA,
so the weights a run trains are bit for bit those of the same run without precise BN, in every
regime: only the BN buffers of what is evaluated and saved differ.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..engine.sync import all_reduce_mean_


def bn_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (``affine=False`` ones included)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_stats(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every BN's running mean / var, by state-dict key."""
    keep = {id(m) for m in bn_layers(model)}
    return {f"{name}.{k}": getattr(m, k).detach().clone() for name, m in model.named_modules()
            if id(m) in keep for k in ("running_mean", "running_var")}


@torch.no_grad()
def load_bn_stats(model: nn.Module, stats: Dict[str, torch.Tensor]) -> None:
    """Put back what :func:`bn_stats` copied (every key must exist: a mismatch is an error)."""
    mods = dict(model.named_modules())
    for key, v in stats.items():
        name, _, k = key.rpartition(".")
        getattr(mods[name], k).copy_(v)


def precise_bn_indices(pool: Sequence[int], batches: int, batch_size: int, world_size: int,
                       seed: int) -> np.ndarray:
    """Sorted positions (drawn from ``pool``) for ``batches`` batches of ``batch_size`` over all
    ranks, rounded down to whole batches on every rank (equal counts: the mean over ranks is
    then the mean over all batches; no partial batch of one image)."""
    pool = np.asarray(pool, dtype=np.int64)
    if batches < world_size:
        raise ConfigError(f"key 'precise_bn_batches': {batches} batches cannot give each of the {world_size} ranks "
                          "one; set it to at least the number of ranks")
    per_rank = min(batches * batch_size, len(pool)) // (batch_size * world_size)
    if per_rank == 0:
        raise ConfigError(f"key 'precise_bn_batches': {len(pool)} training images are fewer than one batch of "
                          f"{batch_size} per rank ({world_size} ranks)")
    rng = np.random.default_rng(seed)  # numpy's own generator: torch's RNG streams are untouched
    return np.sort(rng.choice(pool, per_rank * batch_size * world_size, replace=False))


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN's running mean / var by the average of its per-batch statistics over
    ``batches`` (train-mode forwards; weights, momentum, ``num_batches_tracked`` and the
    train/eval mode are left as they were). In a process group every rank must call it (the
    ranks' averages are averaged, weighted by their batch counts). Returns the number of
    batches this rank ran."""
    bns = bn_layers(model)
    if not bns:
        return 0
    ema = bn_stats(model)
    saved = [(b.momentum, b.num_batches_tracked.clone()) for b in bns]
    for b in bns:
        b.reset_running_stats()
    was_training = model.training
    model.train()
    n = 0
    try:
        for x in batches:
            for b in bns:  # cumulative average: stat_k = mean of the k batches seen. (momentum=None
                b.momentum = 1.0 / (n + 1)  # does the same, but reads the count back: a sync per BN on CUDA)
            model(x)
            n += 1
    finally:
        model.train(was_training)
    stats = [t for b in bns for t in (b.running_mean, b.running_var)]
    count = torch.full((1,), float(n), dtype=stats[0].dtype, device=stats[0].device)
    for t in stats:  # weight each rank by its batches: mean(n_r * s_r) / mean(n_r)
        t.mul_(n)
    all_reduce_mean_(stats + [count])  # one collective; a no-op outside a process group
    for (momentum, tracked), b in zip(saved, bns):
        b.momentum = momentum
        b.num_batches_tracked.copy_(tracked)
    if float(count) == 0:  # nothing seen anywhere: keep the EMA rather than the reset values
        load_bn_stats(model, ema)
    else:
        for t in stats:
            t.div_(count)
    return n
