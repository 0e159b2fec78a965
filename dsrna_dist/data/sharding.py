"""Which example indices a rank sees in an epoch; shared by every loader backend.

Two modes:
* training (``cover_all=False``): a seeded permutation of all N examples per epoch, cut into
  ``world`` equal contiguous parts of ``N // world``; the ``N % world`` left-over examples
  (a different few each epoch) are skipped so that every rank runs the same number of steps.
* evaluation (``cover_all=True``): strided shard ``order[rank::world]``: every example exactly
  once over all ranks, no padding; rank lengths differ by at most one (so at most one batch):
  never put a collective inside an eval loop, gather once at the end.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import DataError


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The global order of one epoch: identical on every rank (seeded by ``seed`` and ``epoch``)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)


def rank_indices(n: int, rank: int, world: int, epoch: int = 0, seed: int = 0, *,
                 shuffle: bool = True, cover_all: bool = False) -> np.ndarray:
    """Positions (into a dataset of ``n``) that ``rank`` of ``world`` visits this epoch, in order."""
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in [0, world_size={world})")
    order = epoch_order(n, epoch, seed, shuffle)
    if cover_all:
        return order[rank::world]
    per = n // world
    return order[rank * per:(rank + 1) * per]


def rank_length(n: int, rank: int, world: int, cover_all: bool) -> int:
    if cover_all:
        return len(range(rank, n, world))
    return n // world


def num_batches(m: int, batch_size: int, drop_last: bool) -> int:
    return m // batch_size if drop_last else -(-m // batch_size)


def dedupe_by_index(indices: Sequence[int], *columns: Sequence[Any]) -> tuple:
    """Keep the first occurrence of each example index (drops DistributedSampler-style padding).

    Returns ``(unique_indices, *columns)`` filtered the same way, in first-seen order.
    """
    seen: set[int] = set()
    keep = []
    for pos, i in enumerate(indices):
        i = int(i)
        if i not in seen:
            seen.add(i)
            keep.append(pos)
    out = [[int(indices[p]) for p in keep]]
    for col in columns:
        out.append([col[p] for p in keep])
    return tuple(out)
