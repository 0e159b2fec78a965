"""The held-out validation split of the training set that selects ``best.pt``.

Why here and not the search split: the search halves the training set for alpha; retraining
holds a small seeded part out so that model selection never sees the test set (a checkpoint
chosen on test data reports numbers selected on the data they are reported on).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class SplitRecord:
    """What a checkpoint stores about its split; a resume with a different one is refused."""
    size: int
    seed: int
    n_train: int
    digest: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def holdout_split(n: int, val_size: int, seed: int) -> Tuple[np.ndarray, np.ndarray, SplitRecord]:
    """Seeded disjoint sorted ``(train_idx, val_idx)`` covering ``range(n)`` with ``len(val_idx) ==
    val_size``; the same on every rank and every run given (n, val_size, seed)."""
    if val_size <= 0:
        idx = np.arange(n)
        return idx, idx[:0], SplitRecord(0, seed, n, "")
    if val_size >= n:
        raise ConfigError(f"key 'data.val_size': {val_size} held-out images leave none of the {n} "
                          "training images to train on")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    digest = hashlib.sha256(val.astype(np.int64).tobytes()).hexdigest()[:16]
    return train, val, SplitRecord(int(val_size), int(seed), int(n), digest)


def check_resume(saved: Optional[Dict[str, Any]], current: SplitRecord, path: Any) -> Optional[str]:
    """An error message when the checkpoint's split differs from this run's (else None)."""
    if saved is None:
        saved = SplitRecord(0, current.seed, current.n_train, "").to_dict()  # written before splits existed
    if saved.get("size") == current.size == 0:
        return None
    for key in ("size", "seed", "n_train", "digest"):
        if saved.get(key) != getattr(current, key):
            return (f"checkpoint {path} selected best.pt on a different validation split "
                    f"({key} {saved.get(key)!r} there, {getattr(current, key)!r} now: check data.val_size, "
                    f"data.val_seed, data.train_subset); use a new run.name")
    return None
