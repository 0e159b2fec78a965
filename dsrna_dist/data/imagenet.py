"""ImageNet (or any subset of it) as a torchvision ImageFolder tree.

Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (val sorted into class
folders, as the usual ``valprep.sh`` leaves it). Too big for memory: use loader=ffcv (after
``python -m dsrna_dist.data.ffcv_write``) or loader=torchvision.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from .base import DATASETS, Dataset, DatasetInfo
from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

_SPLIT_DIR = {"train": "train", "test": "val", "val": "val"}


def pil_loader(path: str) -> Any:
    """Open an image as RGB; a corrupt or truncated file raises DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces a full decode inside the try
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None


@DATASETS.register("imagenet")
class ImageNet(Dataset):
    name = "imagenet"
    default_flip = True
    in_memory = False

    @classmethod
    def info(cls, cfg: Optional["DataConfig"] = None) -> DatasetInfo:
        size, classes = 224, 1000
        if cfg is not None:
            size = cfg.image_size
            train = os.path.join(cfg.root, "train") if cfg.root else ""
            if train and os.path.isdir(train):  # subsets (ImageNet-100, tests) have fewer classes
                classes = sum(1 for e in os.scandir(train) if e.is_dir()) or classes
        return DatasetInfo("imagenet", 3, size, classes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    @classmethod
    def split_dir(cls, cfg: "DataConfig", split: str) -> str:
        if not cfg.root:
            raise DataError("imagenet: set data.root to the folder holding train/ and val/")
        d = os.path.join(cfg.root, _SPLIT_DIR[split])
        if not os.path.isdir(d):
            raise DataError(f"imagenet: {d} not found (expected <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG)")
        return d

    @classmethod
    def image_folder(cls, cfg: "DataConfig", split: str, transform: Any = None) -> Any:
        from torchvision.datasets import ImageFolder

        d = cls.split_dir(cfg, split)
        # classes come from train/ so that val labels use the same class -> index mapping
        train_dir = cls.split_dir(cfg, "train")
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        try:
            ds = ImageFolder(d, transform=transform, loader=pil_loader)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"imagenet: {d}: {e}") from None
        if ds.classes != classes:
            missing = sorted(set(classes) ^ set(ds.classes))[:3]
            raise DataError(f"imagenet: class folders of {d} differ from {train_dir} (e.g. {missing})")
        return ds
