"""Convert any registered dataset split into an FFCV .beton file (atomically).

    python -m dsrna_dist.data.ffcv_write --data.name=cifar10 --split=train --out=data/ffcv/cifar10_train.beton
    python -m dsrna_dist.data.ffcv_write --config=configs/train/x.yaml --split=test   (uses its data: section)

Small sets are stored as raw uint8 arrays (decoding is a memcpy); ImageNet as JPEG with the
longest side capped at ``data.ffcv_max_resolution``. Every record also stores its ``index``
so evaluation can prove coverage. The file is written next to ``--out`` under a temporary
name and renamed at the end: an interrupted run never leaves a half-written .beton.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from ..config import DataConfig
from .base import get_dataset, load_arrays
from .errors import DataError
from .ffcv_loader import beton_path, require_ffcv


class _ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], int(self.labels[i]), int(i)


class _FolderSource:
    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple:
        img, label = self.folder[i]
        return np.asarray(img, dtype=np.uint8), int(label), int(i)


@dataclasses.dataclass(frozen=True)
class _WriterConfig:
    """The writer's config: just a data section, so errors name keys as ``data.<field>``."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)


def write_beton(cfg: Any, split: str, out: str, num_workers: int = 1) -> str:
    """Write ``split`` of ``cfg.name`` to ``out``; returns ``out``. Raises DataError on bad input."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    if split not in ("train", "test"):
        raise DataError(f"--split must be train or test, got {split!r}")
    ds_cls = get_dataset(cfg.name)
    if ds_cls.in_memory:
        arrays = load_arrays(cfg, split)
        images = arrays.images.numpy()
        source: Any = _ArraySource(images, arrays.labels.numpy())
        image_field: Any = NDArrayField(dtype=np.dtype("uint8"), shape=tuple(images.shape[1:]))
    else:
        source = _FolderSource(ds_cls.image_folder(cfg, split))
        image_field = RGBImageField(write_mode="jpg", max_resolution=cfg.ffcv_max_resolution,
                                    jpeg_quality=cfg.ffcv_jpeg_quality)
    if len(source) == 0:
        raise DataError(f"{cfg.name} {split}: no images to write")
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(out) + ".", suffix=".tmp")
    os.close(fd)
    try:
        # small raw records: FFCV's minimum page (2 MiB) instead of 8 MiB keeps tiny files tiny
        page = {"page_size": MIN_PAGE_SIZE} if ds_cls.in_memory else {}
        writer = DatasetWriter(tmp, {"image": image_field, "label": IntField(), "index": IntField()},
                               num_workers=max(1, num_workers), **page)
        writer.from_indexed_dataset(source, chunksize=256)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _parse_value(text: str) -> Any:
    """Command-line value -> YAML scalar (``3`` -> int, ``true`` -> bool, ``1,28,28`` -> list)."""
    import yaml

    try:
        if "," in text:
            return [yaml.safe_load(t) for t in text.split(",")]
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..config import ConfigError, load_config, read_yaml

    p = argparse.ArgumentParser(prog="python -m dsrna_dist.data.ffcv_write",
                                description="Write a dataset split as an FFCV .beton file. "
                                            "Any DataConfig field can be set as --data.<field>=value.")
    p.add_argument("--config", default="", help="YAML config whose data: section is used")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--out", default="", help="output path (default <data.ffcv_dir>/<name>_<split>.beton)")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    args, rest = p.parse_known_args(argv)
    overrides = {}
    for a in rest:
        if not a.startswith("--data.") or "=" not in a:
            print(f"error: unexpected argument {a!r} (use --data.<field>=value)", file=sys.stderr)
            return 2
        k, v = a[len("--data."):].split("=", 1)
        overrides[k] = _parse_value(v)
    try:
        section = dict(read_yaml(args.config).get("data") or {}) if args.config else {}
        dotted = {"data." + k: v for k, v in overrides.items()}
        cfg = load_config(_WriterConfig, None, {"data": section, **dotted}).data
        out = args.out or beton_path(cfg, args.split)
        write_beton(cfg, args.split, out, args.workers)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
