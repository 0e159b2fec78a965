"""Shared loader of the two 28x28 grayscale IDX datasets (MNIST and Fashion-MNIST).

Where files are looked for, in order: ``data.root`` (and its torchvision layout
``<root>/<Folder>/raw``) when set; otherwise the system copy (Debian package) and
``./data/<Folder>/raw``; finally torchvision's downloader when ``data.download`` is true.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from .base import ArrayDataset, Dataset, DatasetInfo, check_arrays
from .errors import DataError
from .idx import find_file, read_idx

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class MnistLike(Dataset):
    folder: str = ""          # torchvision's folder name (MNIST, FashionMNIST)
    system_dir: str = ""      # where a system package installs the files
    install_hint: str = ""
    mean: Tuple[float, ...] = (0.5,)
    std: Tuple[float, ...] = (0.5,)
    sizes = {"train": 60000, "test": 10000}

    @classmethod
    def info(cls, cfg: Optional["DataConfig"] = None) -> DatasetInfo:
        return DatasetInfo(cls.name, 1, 28, 10, cls.mean, cls.std)

    @classmethod
    def search_dirs(cls, cfg: "DataConfig") -> List[str]:
        if cfg.root:
            return [cfg.root, os.path.join(cfg.root, cls.folder, "raw")]
        return [cls.system_dir, os.path.join("data", cls.folder, "raw")]

    @classmethod
    def _download(cls, cfg: "DataConfig") -> List[str]:
        import torchvision

        root = cfg.root or "data"
        try:
            getattr(torchvision.datasets, cls.folder)(root, train=True, download=True)
        except Exception as e:  # noqa: BLE001 - network/IO errors become one clear line
            raise DataError(f"{cls.name}: download into {root} failed ({type(e).__name__}: {e})") from None
        return [os.path.join(root, cls.folder, "raw")]

    @classmethod
    def load_arrays(cls, cfg: "DataConfig", split: str) -> ArrayDataset:
        img_stem, lbl_stem = _FILES[split]
        dirs = cls.search_dirs(cfg)
        img_path, lbl_path = find_file(dirs, img_stem), find_file(dirs, lbl_stem)
        if (img_path is None or lbl_path is None) and cfg.download:
            dirs = cls._download(cfg)
            img_path, lbl_path = find_file(dirs, img_stem), find_file(dirs, lbl_stem)
        for stem, path in ((img_stem, img_path), (lbl_stem, lbl_path)):
            if path is None:
                where = ", ".join(d for d in dirs if d)
                raise DataError(f"{cls.name}: {stem}[.gz] not found in {where}; {cls.install_hint}"
                                "set data.root, or set data.download=true")
        images = read_idx(img_path, 3, (None, 28, 28))
        labels = read_idx(lbl_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{img_path}: {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
        if labels.size and int(labels.max()) >= 10:
            raise DataError(f"{lbl_path}: label {int(labels.max())} outside [0, 10)")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        y = torch.from_numpy(labels.astype("int64"))
        info = cls.info(cfg)
        check_arrays(x, y, info, img_path)
        return ArrayDataset(x, y, info)
