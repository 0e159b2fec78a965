"""A deterministic synthetic image set: one smooth random pattern per class plus noise.

Why: tests and benchmarks need data that is instant to make, identical on every rank and run,
and learnable by a tiny network (classes differ in a smooth, class-specific pattern; the
noise makes it non-trivial). Shape, classes and sizes come from ``data.synthetic_*``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .base import DATASETS, ArrayDataset, Dataset, DatasetInfo

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig


def _shape(cfg: Optional["DataConfig"]) -> tuple[int, int, int, int]:
    if cfg is None:
        return 3, 32, 10, 0
    c, h, w = cfg.synthetic_shape
    if h != w:
        from .errors import DataError

        raise DataError(f"key 'data.synthetic_shape': images must be square, got {h}x{w}")
    return c, h, cfg.synthetic_classes, cfg.synthetic_seed


def make_synthetic(n: int, channels: int, size: int, classes: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [n, C, S, S], int64 [n]); the class patterns depend on ``seed`` only, noise also on split."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed * 1000003 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    noise = torch.randn(n, channels, size, size, generator=g) * 0.15
    shift = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.2
    x = 0.2 + 0.6 * patterns[labels] + noise + shift
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels.long()


@DATASETS.register("synthetic")
class Synthetic(Dataset):
    name = "synthetic"
    default_flip = False  # the class patterns are not mirror-symmetric

    @classmethod
    def info(cls, cfg: Optional["DataConfig"] = None) -> DatasetInfo:
        c, s, k, _ = _shape(cfg)
        return DatasetInfo("synthetic", c, s, k, (0.5,) * c, (0.25,) * c)

    @classmethod
    def load_arrays(cls, cfg: "DataConfig", split: str) -> ArrayDataset:
        c, s, k, seed = _shape(cfg)
        n = cfg.synthetic_size if split == "train" else cfg.synthetic_test_size
        x, y = make_synthetic(n, c, s, k, seed, split)
        return ArrayDataset(x, y, cls.info(cfg))
