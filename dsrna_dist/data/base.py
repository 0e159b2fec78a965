"""Dataset plug-in interface: ``DATASETS`` registry, ``DatasetInfo`` and ``ArrayDataset``.

A dataset is one file in this package that registers a subclass of :class:`Dataset` by name.
Small sets (MNIST-like, CIFAR, synthetic) implement :meth:`Dataset.load_arrays` and are held in
memory as one uint8 tensor; folder sets (ImageNet) implement :meth:`Dataset.image_folder`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

import torch

from ..registry import Registry
from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

DATASETS: "Registry[type[Dataset]]" = Registry("dataset")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its inputs (normalisation happens inside the model)."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass
class ArrayDataset:
    """A whole split in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Any) -> "ArrayDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.info)


class Dataset:
    """Base class of a registered dataset. Subclasses set ``default_flip`` and override ``info``."""

    name: str = ""
    default_flip: bool = False  # is a horizontal flip label-preserving *and* customary here?
    in_memory: bool = True      # small enough for MemoryLoader (load_arrays)

    @classmethod
    def info(cls, cfg: Optional["DataConfig"] = None) -> DatasetInfo:
        raise NotImplementedError

    @classmethod
    def load_arrays(cls, cfg: "DataConfig", split: str) -> ArrayDataset:
        raise DataError(f"dataset {cls.name!r} is not an in-memory dataset; use data.loader=ffcv or torchvision")

    @classmethod
    def image_folder(cls, cfg: "DataConfig", split: str, transform: Any = None) -> Any:
        """A torchvision-style map dataset of (PIL image or CHW uint8 tensor, label)."""
        raise DataError(f"dataset {cls.name!r} has no image-folder form")


def get_dataset(name: str) -> type[Dataset]:
    from . import _plugins  # noqa: F401  (registers every dataset file)

    try:
        return DATASETS.get(name, key="data.name")
    except KeyError as e:  # RegistryError is a KeyError; data users expect DataError
        raise DataError(str(e)) from None


def dataset_info(name_or_cfg: Union[str, "DataConfig"]) -> DatasetInfo:
    """Shape, class count and per-channel mean/std of a dataset.

    Pass the ``DataConfig`` (not just its name) when the shape depends on options
    (synthetic shape/classes, ImageNet crop size).
    """
    if isinstance(name_or_cfg, str):
        return get_dataset(name_or_cfg).info(None)
    return get_dataset(name_or_cfg.name).info(name_or_cfg)


def load_arrays(cfg: "DataConfig", split: str) -> ArrayDataset:
    """Load a small dataset split fully into memory, honouring train_subset/test_subset."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    ds = get_dataset(cfg.name).load_arrays(cfg, split)
    limit = cfg.train_subset if split == "train" else cfg.test_subset
    if limit and limit < len(ds):
        ds = ArrayDataset(ds.images[:limit].contiguous(), ds.labels[:limit].contiguous(), ds.info)
    return ds


def check_arrays(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, where: str) -> None:
    """Final consistency check of decoded arrays against the dataset's declared shape."""
    c, s = info.in_channels, info.image_size
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise DataError(f"{where}: images have shape {tuple(images.shape)} {images.dtype}, "
                        f"expected [N, {c}, {s}, {s}] uint8")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"{where}: labels outside [0, {info.num_classes}): "
                        f"min {int(labels.min())}, max {int(labels.max())}")


def first_existing_dir(candidates: list[str]) -> Optional[str]:
    for d in candidates:
        if d and os.path.isdir(d):
            return d
    return None
