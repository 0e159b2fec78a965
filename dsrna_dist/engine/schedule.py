"""The one learning-rate schedule of the search and the retraining, and the arch lr of the search.

Pure functions of (config, position), not ``torch.optim.lr_scheduler`` objects. Why:

- exact resume for free: the position (epoch, step) is already in every checkpoint, so a resumed
  run recomputes the same float; a scheduler would add state that must follow P-DARTS's optimizer
  rebuild at every stage change and DeepSpeed's own lr handling (``engine=deepspeed``);
- bit-identical values: torch's chainable ``CosineAnnealingLR.step()`` is recursive and drifts from
  the closed form (19386 of 19500 per-step values differ, up to 2.9e-13 relative), and ``LinearLR``
  ramps ``start + (1 - start) k / W`` instead of ``(k + 1) / W``; a ``LambdaLR`` would re-round
  ``base_lr * (lr / base_lr)``. Every rank computes the same float from the same position.

The rule: a linear warm-up per *step* over the first ``warmup_epochs`` epochs (step k of the run,
counted from 0, gets ``base_lr * (k + 1) / (warmup_epochs * steps_per_epoch)``), then the per-epoch
schedule (cosine as torch's closed form and the DARTS reference, which steps it per epoch; step
decay; constant). The cosine runs over all ``epochs`` from epoch 0, warm-up epochs included.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import ArchOptimConfig, OptimConfig


def lr_at(o: OptimConfig, epoch: int, step: int, steps_per_epoch: int, epochs: int,
          base_lr: Optional[float] = None) -> float:
    """Weight lr at ``step`` (0-based, within ``epoch``) of a run of ``epochs`` epochs.

    ``base_lr``: the peak rate (train: ``optim.lr`` after the linear batch-size scaling;
    default ``o.lr``). P-DARTS restarts it per stage by passing the epoch within the stage and
    the stage's length (``SearchStrategy.lr_position``)."""
    base = o.lr if base_lr is None else base_lr
    if o.warmup_epochs and epoch < o.warmup_epochs:
        done = epoch * steps_per_epoch + step + 1
        return base * done / (o.warmup_epochs * max(1, steps_per_epoch))
    if o.schedule == "cosine":
        return o.lr_min + 0.5 * (base - o.lr_min) * (1 + math.cos(math.pi * epoch / epochs))
    if o.schedule == "step":
        return base * o.step_gamma ** (epoch // o.step_size)
    return base


def arch_lr_at(cfg: ArchOptimConfig, progress: float, start_epoch: int, epochs: int) -> float:
    """Arch lr at ``progress`` = epoch + fraction of the epoch done: constant, or cosine from
    ``lr`` at the first arch-active epoch (``start_epoch``) to ``lr_min`` at the end, or its
    square (``cosine2``: the same ends, 3/4 of cosine's step sum). Where the arch gradient is
    noise (a near-tie), alpha random-walks with a spread set by the sum of squared steps; the
    last quarter holds 0.29% of that sum under cosine (a spread 5.4% of the whole search's) and
    0.005% under cosine2 (0.7%), so a tie decided by then stays decided (lr_min = 0)."""
    if cfg.schedule == "constant":
        return cfg.lr
    t = min(max((progress - start_epoch) / max(1, epochs - start_epoch), 0.0), 1.0)
    c = 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (c * c if cfg.schedule == "cosine2" else c)
