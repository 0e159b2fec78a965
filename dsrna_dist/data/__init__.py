"""Data layer: datasets by name, the DARTS search split, and three loader backends.

Public API (see the module docstrings for the why):
    dataset_info(name or DataConfig) -> DatasetInfo
    load_arrays(cfg, "train"|"test") -> ArrayDataset(images uint8 [N,C,H,W], labels int64 [N], info)
    search_split(n, portion, seed) -> (train_idx, val_idx)
    MemoryLoader(images, labels, batch_size, *, shuffle, seed, rank, world_size, drop_last, augment, device)
    build_train_loader(cfg, rank, world_size, device, seed, indices=None)
    build_eval_loader(cfg, rank, world_size, device, seed=0, indices=None, split="test")
    build_augment(cfg, info=None) -> Augment | None
    DataError (ValueError): missing / corrupt files, named in the message.
FFCV is optional and imported only when used (``data.loader=ffcv``, ``ffcv_write``).
"""
from .augment import Augment, build_augment, resolve_flip
from .base import DATASETS, ArrayDataset, Dataset, DatasetInfo, dataset_info, get_dataset, load_arrays
from .build import build_eval_loader, build_train_loader
from .errors import DataError
from .memory import MemoryLoader
from .sharding import dedupe_by_index, rank_indices
from .split import search_split

__all__ = [
    "Augment", "build_augment", "resolve_flip", "DATASETS", "ArrayDataset", "Dataset", "DatasetInfo",
    "dataset_info", "get_dataset", "load_arrays", "build_eval_loader", "build_train_loader", "DataError",
    "MemoryLoader", "dedupe_by_index", "rank_indices", "search_split",
]
