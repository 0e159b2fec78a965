"""The DARTS search split: the training set halved into a weight part and an architecture part."""
from __future__ import annotations

import numpy as np

from .errors import DataError


def search_split(n: int, portion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint ``(train_idx, val_idx)`` covering ``range(n)``; ``floor(portion * n)`` for weights.

    Seeded (not the first half, as in the original DARTS code) so that a class-sorted file does
    not put whole classes on one side; identical on every rank given the same seed.
    """
    if not 0.0 < portion < 1.0:
        raise DataError(f"key 'data.train_portion': {portion} must be in (0, 1)")
    split = int(np.floor(portion * n))
    if split == 0 or split == n:
        raise DataError(f"key 'data.train_portion': {portion} of {n} images leaves one search half empty")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:split]), np.sort(perm[split:])
