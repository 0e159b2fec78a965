"""FFCV backend (optional): .beton files read by FFCV's JIT-compiled pipelines.

FFCV is imported lazily; without it every entry here raises a DataError that says how to
install the ``ffcv`` extra. Sharding uses our own :class:`ShardedOrder` (the rules of
:mod:`.sharding`) instead of ``Loader(distributed=True)``: the same split on every backend,
no padded duplicates in evaluation (each example exactly once over all ranks), and no
process group needed to build a loader. Each .beton also stores an ``index`` field, so a
consumer can check coverage or drop duplicates (:func:`.sharding.dedupe_by_index`) if it
uses FFCV's own DistributedSampler-style order.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .augment import Augment
from .errors import DataError
from .sharding import num_batches, rank_indices, rank_length

INSTALL_HINT = ("install the ffcv extra: `pip install 'dsrna_dist[ffcv]'` (ffcv==1.0.2, numba, opencv; "
                "needs `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` and g++)")


def beton_path(cfg: Any, split: str) -> str:
    """Where loaders look for ``<name>_<split>.beton`` (``data.ffcv_dir``, default data/ffcv)."""
    return os.path.join(cfg.ffcv_dir or os.path.join("data", "ffcv"), f"{cfg.name}_{split}.beton")


def require_ffcv() -> Any:
    """Import ffcv or raise a DataError telling the user how to install it."""
    try:
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
    except ImportError as e:
        raise DataError(f"data.loader=ffcv needs FFCV, which is not importable ({e}); {INSTALL_HINT}") from None
    return ffcv


def progressive_resolution(epoch: int, start_res: int, end_res: int, start_epoch: int, end_epoch: int,
                           multiple: int = 32) -> int:
    """ffcv-imagenet style schedule: ``start_res`` until ``start_epoch``, linear ramp to
    ``end_res`` at ``end_epoch``, rounded to a multiple of ``multiple`` (clipped to the range)."""
    if start_res <= 0 or end_epoch <= start_epoch:
        return end_res
    if epoch <= start_epoch:
        return start_res
    if epoch >= end_epoch:
        return end_res
    res = start_res + (end_res - start_res) * (epoch - start_epoch) / (end_epoch - start_epoch)
    res = int(round(res / multiple)) * multiple
    lo, hi = min(start_res, end_res), max(start_res, end_res)
    return int(min(max(res, lo), hi))


def _order_class() -> type:
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedOrder(TraversalOrder):
        """Our rank sharding as an FFCV traversal order (``Loader(order=ShardedOrder(...))``).

        FFCV 1.0.2 accepts an *instance* of a TraversalOrder and calls it with the loader.
        """

        def __init__(self, rank: int, world: int, seed: int, shuffle: bool, cover_all: bool) -> None:
            self.rank, self.world, self.order_seed = rank, world, seed
            self.shuffle, self.cover_all = shuffle, cover_all
            self.sampler = None

        def __call__(self, loader: Any) -> "ShardedOrder":
            self.loader, self.indices = loader, np.asarray(loader.indices)
            self.seed, self.distributed = loader.seed, False
            return self

        def sample_order(self, epoch: int) -> Sequence[int]:
            pos = rank_indices(len(self.indices), self.rank, self.world, epoch, self.order_seed,
                               shuffle=self.shuffle, cover_all=self.cover_all)
            return self.indices[pos]

    return ShardedOrder


class FFCVLoader:
    """Yields ``(x float32 [B, C, H, W] in [0, 1] on device, y int64)`` (plus the example index
    when ``with_index``) from a .beton written by :mod:`.ffcv_write`.

    ``kind="raw"``: small sets stored as uint8 arrays; ``augment`` runs batched on the device.
    ``kind="jpg"``: ImageNet; ``train`` picks RandomResizedCrop + flip, otherwise a center crop of
    ``crop_ratio``; ``res_schedule(epoch) -> int`` enables progressive resolution.
    """

    def __init__(self, path: str, batch_size: int, *, kind: str, shuffle: bool, seed: int, rank: int,
                 world_size: int, drop_last: bool, cover_all: bool, device: torch.device | str,
                 num_workers: int, augment: Optional[Augment] = None, train: bool = False,
                 image_size: int = 224, crop_ratio: float = 0.875, min_scale: float = 0.08,
                 flip: bool = False, res_schedule: Any = None, indices: Optional[Sequence[int]] = None,
                 with_index: bool = False, os_cache: bool = True) -> None:
        require_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        self.device = torch.device(device)
        self.batch_size, self.drop_last, self.seed, self.rank = batch_size, drop_last, seed, rank
        self.world_size, self.cover_all, self.shuffle = world_size, cover_all, shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.with_index, self.res_schedule, self.epoch = with_index, res_schedule, 0
        self.decoder: Any = None
        # on CUDA, FFCV copies batches to the GPU itself (pinned buffers, its own stream); on CPU we
        # skip ToDevice and the .to(device) below is a no-op
        to_dev = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        if kind == "raw":
            image_pipe: list = [NDArrayDecoder(), ToTensor()] + to_dev
        elif kind == "jpg":
            res = res_schedule(0) if res_schedule else image_size
            if train:
                self.decoder = RandomResizedCropRGBImageDecoder((res, res), scale=(min_scale, 1.0))
                image_pipe = [self.decoder] + ([RandomHorizontalFlip()] if flip else [])
            else:
                self.decoder = CenterCropRGBImageDecoder((image_size, image_size), ratio=crop_ratio)
                image_pipe = [self.decoder]
            image_pipe += [ToTensor()] + to_dev + [ToTorchImage()]
        else:
            raise DataError(f"unknown ffcv image kind {kind!r} (raw or jpg)")
        def int_pipe() -> list:  # fresh operation objects per field
            return [IntDecoder(), ToTensor(), Squeeze(1)] + (
                [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])

        pipelines = {"image": image_pipe, "label": int_pipe(), "index": int_pipe() if with_index else None}
        order = _order_class()(rank, world_size, seed, shuffle, cover_all)
        try:
            self.loader = Loader(path, batch_size=batch_size, num_workers=max(1, num_workers),
                                 os_cache=os_cache, order=order, seed=seed, indices=indices,
                                 pipelines=pipelines, drop_last=drop_last,
                                 recompile=res_schedule is not None)
        except FileNotFoundError:
            raise DataError(f"{path}: .beton file not found") from None
        except Exception as e:  # noqa: BLE001 - FFCV's header parser fails in many ways on a bad file
            raise DataError(f"{path}: not a readable .beton file ({type(e).__name__}: {e})") from None
        self.n = len(self.loader.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.loader.next_epoch = self.epoch
        if self.res_schedule is not None and self.decoder is not None:
            res = int(self.res_schedule(self.epoch))
            self.decoder.output_size = (res, res)

    @property
    def resolution(self) -> Optional[int]:
        return None if self.decoder is None else int(self.decoder.output_size[0])

    def __len__(self) -> int:
        m = rank_length(self.n, self.rank, self.world_size, self.cover_all)
        return num_batches(m, self.batch_size, self.drop_last)

    @property
    def num_examples(self) -> int:
        m = rank_length(self.n, self.rank, self.world_size, self.cover_all)
        return m if not self.drop_last else (m // self.batch_size) * self.batch_size

    @property
    def indices(self) -> np.ndarray:
        """Record indices (positions in the .beton) this rank yields this epoch, in yield order."""
        pos = rank_indices(self.n, self.rank, self.world_size, self.epoch, self.seed,
                           shuffle=self.shuffle, cover_all=self.cover_all)
        return np.asarray(self.loader.indices)[pos][:self.num_examples].astype(np.int64)

    def __iter__(self) -> Iterator[tuple]:
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        self.loader.next_epoch = self.epoch
        for batch in self.loader:
            x = batch[0].to(self.device, non_blocking=True)
            if gen is not None:
                x = self.augment(x, gen)
            # float()/long() copy: FFCV reuses its batch buffers a few batches later
            out = (x.float().div_(255.0), batch[1].to(self.device, torch.long))
            if self.with_index:
                out = out + (batch[2].to(self.device, torch.long),)
            yield out
