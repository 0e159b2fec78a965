"""Learning rates per epoch (weights) and per step (architecture): pure functions, so a resumed
run needs no scheduler state."""
from __future__ import annotations

import math

from ..config import ArchOptimConfig, OptimConfig


def lr_at(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """cosine (DARTS: lr -> lr_min over ``epochs``, epoch 0 at full lr), step or constant,
    after an optional linear warmup of ``warmup_epochs``."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (epoch // cfg.step_size)
    t = epoch / max(1, epochs)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))


def arch_lr_at(cfg: ArchOptimConfig, progress: float, start_epoch: int, epochs: int) -> float:
    """Arch lr at ``progress`` = epoch + fraction of the epoch done: constant, or cosine from
    ``lr`` at the first arch-active epoch (``start_epoch``) to ``lr_min`` at the end."""
    if cfg.schedule == "constant":
        return cfg.lr
    t = min(max((progress - start_epoch) / max(1, epochs - start_epoch), 0.0), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))
