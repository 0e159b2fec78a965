"""Checks a stage runs before it writes anything: the data it will read is there and readable.

Why: a stage that creates its run dir, rewrites ``config.yaml`` or opens a TensorBoard file and
only *then* discovers ``--data.root=/nonexistent`` leaves an existing run changed (or a fresh,
empty run dir) by a start that never started. Each stage's ``preflight`` calls these, so bad
input fails with one ``error:`` line while every file on disk stays byte-identical.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence


def check_data(data_cfg: Any, splits: Sequence[str] = ("train", "test")) -> Dict[str, int]:
    """Open every split the stage will read with the configured loader; ``{split: examples}``.

    In-memory datasets are decoded in full (the same code the loaders run; a few hundred ms for
    the small sets), FFCV ``.beton`` files and ImageNet folders are opened and counted. Raises
    ``DataError``/``ConfigError`` naming the file or key.
    """
    from dsrna_dist.data import DataError, get_dataset, load_arrays

    ds = get_dataset(data_cfg.name)
    out: Dict[str, int] = {}
    for split in splits:
        if data_cfg.loader == "ffcv":
            from dsrna_dist.data.ffcv_loader import beton_path

            path = beton_path(data_cfg, split)
            if not os.path.isfile(path):
                raise DataError(f"{path}: .beton file not found; write it with `python -m "
                                f"dsrna_dist.data.ffcv_write --data.name={data_cfg.name} --split={split} "
                                f"--out={path}` (or set data.ffcv_dir)")
            out[split] = -1  # counted by the loader (needs ffcv)
        elif ds.in_memory:
            out[split] = len(load_arrays(data_cfg, split))
        else:
            if data_cfg.loader == "memory":
                raise DataError(f"key 'data.loader': {data_cfg.name} does not fit in memory; "
                                "use ffcv or torchvision")
            out[split] = len(ds.image_folder(data_cfg, split))
    return out
