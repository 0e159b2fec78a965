"""torchvision/DataLoader backend: ImageFolder (ImageNet) or an in-memory array set, sharded by rank.

The per-sample PIL work of ImageNet runs in DataLoader workers; sharding uses the same
:mod:`.sharding` rules as the other backends (a sampler, not DistributedSampler, so there is
no padding and no process group is needed to build it).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .augment import Augment
from .sharding import num_batches, rank_indices, rank_length


class ShardSampler(Sampler[int]):
    """Indices of one rank for the current epoch (``set_epoch``), see :func:`rank_indices`."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool, cover_all: bool,
                 with_epoch: bool = False) -> None:
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.shuffle, self.cover_all, self.epoch = shuffle, cover_all, 0
        self.with_epoch = with_epoch  # yield (index, epoch): the key of a _SampleSeeded dataset
        rank_indices(1, rank, world)  # validates rank/world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        return rank_indices(self.n, self.rank, self.world, self.epoch, self.seed,
                            shuffle=self.shuffle, cover_all=self.cover_all)

    def __iter__(self) -> Iterator[Any]:
        if self.with_epoch:
            return iter([(i, self.epoch) for i in self.indices().tolist()])
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return rank_length(self.n, self.rank, self.world, self.cover_all)


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class _SampleSeeded(torch.utils.data.Dataset):
    """``dataset[i]`` with its random transform seeded by (seed, epoch, i).

    Why: DataLoader workers seed their torch RNG once from the main process's global stream
    (persistent workers: once per run), so after a resume every random crop and flip would differ
    from the uninterrupted run's. Keyed by the sample, the augmentation is the same after a
    resume and for any ``num_workers``. The caller's RNG is left as it was (``fork_rng``)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        i, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + i) % (2 ** 63))
            return self.dataset[i]


class TorchvisionLoader:
    """Yields ``(x float32 in [0, 1] on device, y int64 on device)`` from a map dataset of
    (CHW uint8 tensor, label); ``augment`` (batched, on device) is applied after transfer."""

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool, seed: int, rank: int,
                 world_size: int, drop_last: bool, cover_all: bool, device: torch.device | str,
                 num_workers: int, augment: Optional[Augment] = None, seed_samples: bool = True) -> None:
        self.device = torch.device(device)
        self.batch_size, self.drop_last, self.seed, self.rank = batch_size, drop_last, seed, rank
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed, shuffle, cover_all,
                                    with_epoch=seed_samples)
        if seed_samples:  # per-sample transforms (ImageFolder): reproducible across resumes
            dataset = _SampleSeeded(dataset, seed)
        self.augment = augment if augment is not None and augment.active else None
        self.epoch = 0
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_workers, drop_last=drop_last,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0,
                                 # its per-iteration base seed: not a draw from the global stream
                                 generator=torch.Generator().manual_seed(seed * 1009 + rank))

    @classmethod
    def from_arrays(cls, images: torch.Tensor, labels: torch.Tensor, batch_size: int, **kw: Any) -> "TorchvisionLoader":
        return cls(_Arrays(images, labels), batch_size, seed_samples=False, **kw)  # no per-sample RNG

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return num_batches(len(self.sampler), self.batch_size, self.drop_last)

    @property
    def num_examples(self) -> int:
        m = len(self.sampler)
        return m if not self.drop_last else (m // self.batch_size) * self.batch_size

    @property
    def indices(self) -> np.ndarray:
        return self.sampler.indices()[:self.num_examples]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if gen is not None:
                x = self.augment(x, gen)
            yield x.float().div_(255.0), y.to(self.device, torch.long, non_blocking=True)


def imagenet_transform(train: bool, size: int, crop_ratio: float, min_scale: float, flip: bool) -> Any:
    """RandomResizedCrop(+flip) for training, Resize + CenterCrop for evaluation; uint8 CHW out."""
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0))]
        if flip:
            ops.append(T.RandomHorizontalFlip())
    else:
        ops = [T.Resize(int(round(size / crop_ratio))), T.CenterCrop(size)]
    return T.Compose(ops + [T.PILToTensor()])
