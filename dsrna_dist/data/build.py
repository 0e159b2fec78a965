"""``build_train_loader`` / ``build_eval_loader``: pick the backend named by ``data.loader``.

* memory: small sets (fashion_mnist, mnist, cifar10, synthetic) held as one tensor on the device.
* ffcv: ``<data.ffcv_dir>/<name>_<split>.beton`` written by ``python -m dsrna_dist.data.ffcv_write``.
* torchvision: DataLoader workers; ImageFolder with RandomResizedCrop/flip (train) or
  Resize/CenterCrop (eval) for ImageNet, the in-memory arrays otherwise.

Training loaders shuffle with a seeded per-epoch order, give every rank the same number of
steps and drop the last partial batch; evaluation loaders cover every example exactly once
over all ranks (strided shard, no padding). ``indices`` restricts either to a subset of the
split (the search halves from :func:`search_split`).
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from .augment import build_augment, resolve_flip
from .base import get_dataset, load_arrays
from .errors import DataError
from .ffcv_loader import FFCVLoader, beton_path, progressive_resolution
from .memory import MemoryLoader
from .torchvision_loader import TorchvisionLoader, imagenet_transform

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

Loader = Any  # MemoryLoader | FFCVLoader | TorchvisionLoader: set_epoch, __len__, __iter__


def _subset_indices(cfg: "DataConfig", split: str, n: int, indices: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """Combine ``indices`` with data.train_subset/test_subset (positions in the full split)."""
    limit = cfg.train_subset if split == "train" else cfg.test_subset
    if indices is None:
        return np.arange(min(limit, n)) if limit and limit < n else None
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{cfg.name} {split}: indices outside [0, {n})")
    return idx[idx < limit] if limit else idx


def _take(images: torch.Tensor, labels: torch.Tensor, indices: Optional[Sequence[int]], where: str) -> tuple:
    """Rows ``indices`` of the (already subset-limited) arrays; out-of-range positions are an error."""
    if indices is None:
        return images, labels
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(labels)):
        raise DataError(f"{where}: indices outside [0, {len(labels)}) (computed on a different split size?)")
    return images[idx], labels[idx]


def _build(cfg: "DataConfig", split: str, train: bool, rank: int, world_size: int, device: Any, seed: int,
           indices: Optional[Sequence[int]]) -> Loader:
    ds_cls = get_dataset(cfg.name)
    bs = cfg.batch_size if train else cfg.eval_batch_size
    common = dict(shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=train,
                  cover_all=not train, device=device)
    augment = build_augment(cfg) if train else None
    if cfg.loader == "memory":
        if not ds_cls.in_memory:
            raise DataError(f"key 'data.loader': {cfg.name} does not fit in memory; use ffcv or torchvision")
        arrays = load_arrays(cfg, split)  # honours the subset options
        images, labels = _take(arrays.images, arrays.labels, indices, f"{cfg.name} {split}")
        return MemoryLoader(images, labels, bs, augment=augment, **common)
    if cfg.loader == "ffcv":
        path = beton_path(cfg, split)
        if not os.path.isfile(path):
            raise DataError(f"{path}: .beton file not found; write it with `python -m dsrna_dist.data.ffcv_write "
                            f"--data.name={cfg.name} --split={split} --out={path}` (or set data.ffcv_dir)")
        from .ffcv_loader import require_ffcv

        require_ffcv()
        from ffcv.reader import Reader

        n = Reader(path).num_samples
        idx = _subset_indices(cfg, split, n, indices)
        kind = "raw" if ds_cls.in_memory else "jpg"
        schedule = None
        if kind == "jpg" and train and cfg.res_start > 0 and cfg.res_end_epoch > cfg.res_start_epoch:
            schedule = functools.partial(progressive_resolution, start_res=cfg.res_start, end_res=cfg.image_size,
                                         start_epoch=cfg.res_start_epoch, end_epoch=cfg.res_end_epoch)
        return FFCVLoader(path, bs, kind=kind, num_workers=cfg.num_workers, augment=augment if kind == "raw" else None,
                          train=train, image_size=cfg.image_size, crop_ratio=cfg.eval_crop_ratio,
                          min_scale=cfg.min_scale, flip=resolve_flip(cfg) and train, res_schedule=schedule,
                          indices=idx, os_cache=cfg.ffcv_os_cache, **common)
    # torchvision
    if ds_cls.in_memory:
        arrays = load_arrays(cfg, split)
        images, labels = _take(arrays.images, arrays.labels, indices, f"{cfg.name} {split}")
        return TorchvisionLoader.from_arrays(images, labels, bs, num_workers=cfg.num_workers, augment=augment, **common)
    tf = imagenet_transform(train, cfg.image_size, cfg.eval_crop_ratio, cfg.min_scale, resolve_flip(cfg))
    folder = ds_cls.image_folder(cfg, split, transform=tf)
    idx = _subset_indices(cfg, split, len(folder), indices)
    if idx is not None:
        folder = torch.utils.data.Subset(folder, idx.tolist())
    return TorchvisionLoader(folder, bs, num_workers=cfg.num_workers, **common)


def build_train_loader(cfg: "DataConfig", rank: int, world_size: int, device: Any, seed: int,
                       indices: Optional[Sequence[int]] = None, split: str = "train") -> Loader:
    """Shuffled, augmented, rank-sharded training batches ``(x in [0,1], y)`` (call ``set_epoch``)."""
    return _build(cfg, split, True, rank, world_size, device, seed, indices)


def build_eval_loader(cfg: "DataConfig", rank: int, world_size: int, device: Any, seed: int = 0,
                      indices: Optional[Sequence[int]] = None, split: str = "test") -> Loader:
    """Unshuffled, unaugmented batches; every example of the split exactly once over all ranks.

    ``loader.indices`` (memory/torchvision) gives the dataset positions this rank yields, in order.
    """
    return _build(cfg, split, False, rank, world_size, device, seed, indices)
