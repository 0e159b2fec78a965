"""MemoryLoader: a whole small dataset as one uint8 tensor on the device, batched by indexing.

Why: for MNIST/CIFAR-sized sets a DataLoader's per-sample Python work dominates a small
network's step; here a batch is one ``index_select`` plus batched augmentations on the
device (airbench-style), and building the epoch order is one permutation.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .augment import Augment
from .errors import DataError
from .sharding import num_batches, rank_indices, rank_length


class MemoryLoader:
    """Yields ``(x float32 [B, C, H, W] in [0, 1] on device, y int64 [B] on device)``.

    Sharding: each epoch has one seeded permutation shared by all ranks (``set_epoch``).
    ``cover_all=False`` (training): every rank gets a disjoint contiguous part of
    ``N // world_size`` examples (same length on all ranks); ``drop_last`` then drops the
    rank's final partial batch. ``cover_all=True`` (evaluation): strided shard, every example
    exactly once over all ranks, no padding (see :mod:`.sharding`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, augment: Optional[Augment] = None,
                 device: torch.device | str = "cpu", cover_all: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"MemoryLoader needs uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"MemoryLoader: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise DataError(f"key 'data.batch_size': {batch_size} must be >= 1")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size, self.cover_all = int(rank), int(world_size), cover_all
        self.augment = augment if augment is not None and augment.active else None
        self.epoch = 0
        rank_indices(1, self.rank, self.world_size)  # validates rank/world

    @property
    def num_examples(self) -> int:
        """Examples this rank yields per epoch."""
        m = rank_length(len(self.labels), self.rank, self.world_size, self.cover_all)
        return m if not self.drop_last else (m // self.batch_size) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        m = rank_length(len(self.labels), self.rank, self.world_size, self.cover_all)
        return num_batches(m, self.batch_size, self.drop_last)

    @property
    def indices(self) -> np.ndarray:
        """Dataset positions this rank yields this epoch, in yield order."""
        idx = rank_indices(len(self.labels), self.rank, self.world_size, self.epoch, self.seed,
                           shuffle=self.shuffle, cover_all=self.cover_all)
        return idx[:self.num_examples]

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        return g

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.from_numpy(self.indices).to(self.device)
        gen = self._generator() if self.augment is not None else None
        bs = self.batch_size
        for start in range(0, len(self) * bs, bs):
            b = idx[start:start + bs]
            x = self.images.index_select(0, b)
            if gen is not None:
                x = self.augment(x, gen)
            yield x.float().div_(255.0), self.labels.index_select(0, b)
