"""CIFAR-10 from the official python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``).

The batches are pickles. Nothing from a file may be executed, so they are read with
:class:`SafeUnpickler`, which resolves only the few globals a numpy-array-in-a-dict needs and
refuses everything else (``os.system``, ``builtins.eval``, arbitrary classes, ...).
"""
from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING, Any, List, Optional

import numpy as np
import torch

from .base import DATASETS, ArrayDataset, Dataset, DatasetInfo, check_arrays
from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

# (module, name) pairs an ndarray pickle refers to (numpy 1.x and 2.x spellings)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "list"), ("builtins", "dict"), ("__builtin__", "list"), ("__builtin__", "dict"),
    # protocol-2 pickles written by Python 3 spell every bytes object as _codecs.encode(str, "latin1"):
    # a pure str -> bytes conversion, nothing executable
    ("_codecs", "encode"),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` allows only numpy array reconstruction and list/dict."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 [N, 3, 32, 32], int64 [N]), validated."""
    try:
        with open(path, "rb") as f:
            d = SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused or corrupt pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, OSError, MemoryError) as e:
        raise DataError(f"{path}: truncated or corrupt CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing b'data' or b'labels' key (keys: {sorted(map(str, d))})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: b'data' must be a uint8 [N, 3072] array, got "
                        f"{type(data).__name__} {shape} {getattr(data, 'dtype', '')}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: b'labels' is not a list of integers") from None
    if y.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise DataError(f"{path}: labels outside [0, 10): min {y.min()}, max {y.max()}")
    return data.reshape(-1, 3, 32, 32), y


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    name = "cifar10"
    default_flip = True
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]

    @classmethod
    def info(cls, cfg: Optional["DataConfig"] = None) -> DatasetInfo:
        return DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

    @classmethod
    def batch_dir(cls, cfg: "DataConfig") -> str:
        root = cfg.root or "data"
        candidates: List[str] = [os.path.join(root, "cifar-10-batches-py"), root]
        for d in candidates:
            if os.path.isfile(os.path.join(d, "test_batch")) or os.path.isfile(os.path.join(d, "data_batch_1")):
                return d
        if cfg.download:
            import torchvision

            try:
                torchvision.datasets.CIFAR10(root, train=True, download=True)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cifar10: download into {root} failed ({type(e).__name__}: {e})") from None
            return candidates[0]
        raise DataError(f"cifar10: no CIFAR-10 python batches in {' or '.join(candidates)}; "
                        "set data.root to the folder holding cifar-10-batches-py, or data.download=true")

    @classmethod
    def load_arrays(cls, cfg: "DataConfig", split: str) -> ArrayDataset:
        d = cls.batch_dir(cfg)
        xs, ys = [], []
        for name in cls.train_files if split == "train" else cls.test_files:
            x, y = load_batch(os.path.join(d, name))
            xs.append(x)
            ys.append(y)
        images = torch.from_numpy(np.concatenate(xs))
        labels = torch.from_numpy(np.concatenate(ys))
        info = cls.info(cfg)
        check_arrays(images, labels, info, d)
        return ArrayDataset(images, labels, info)
