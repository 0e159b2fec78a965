"""Seeding: one model-init seed on every rank, independent per-rank streams for data/augment.

Why: identical initial weights are needed for DDP correctness checks and reproducibility;
augmentation, dropout and drop-path should differ across ranks (otherwise N ranks see the same
random crops), but reproducibly, so the per-rank stream is a function of (seed, rank).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by (seed, *keys) (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with the same value on every rank."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_rank_streams(seed: int, rank: int) -> int:
    """Re-seed the global generators with the (seed, rank) stream; call after model init."""
    s = derive_seed(seed, rank)
    seed_everything(s)
    return s


def rank_generator(seed: int, rank: int, device: str | torch.device = "cpu", stream: int = 0) -> torch.Generator:
    """A private torch.Generator for (seed, rank, stream), e.g. for augmentation."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, rank, stream))
    return g


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (slower) or cudnn autotuning; the CPU path is deterministic anyway."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        if torch.are_deterministic_algorithms_enabled():  # the setter imports torch._inductor
            torch.use_deterministic_algorithms(False)     # (~3 s per process): skip a no-op
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = torch.cuda.is_available()
