"""Batched augmentations on uint8 image tensors [B, C, H, W] (CPU or GPU), airbench-style.

Why batched: one kernel per op for the whole batch (per-example random offsets via index
arithmetic, no Python loop per image) keeps the loader far below the cost of a training step.
All randomness comes from an explicit ``torch.Generator`` so epochs are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig


def crop_at(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-example crops ``padded[b, :, dy[b]:dy[b]+h, dx[b]:dx[b]+w]`` in one gather."""
    b, c = padded.shape[:2]
    dev = padded.device
    rows = dy.view(b, 1) + torch.arange(h, device=dev)  # [B, h]
    cols = dx.view(b, 1) + torch.arange(w, device=dev)  # [B, w]
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and take a random same-size crop per example."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    return crop_at(padded, dy, dx, h, w)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each example left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def cutout_at(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square centred at (cy, cx) per example (clipped at borders)."""
    b, _, h, w = x.shape
    dev = x.device
    y0, x0 = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=dev).view(1, h)
    c = torch.arange(w, device=dev).view(1, w)
    in_r = (r >= y0.view(b, 1)) & (r < (y0 + size).view(b, 1))  # [B, h]
    in_c = (c >= x0.view(b, 1)) & (c < (x0 + size).view(b, 1))  # [B, w]
    mask = (in_r.view(b, 1, h, 1) & in_c.view(b, 1, 1, w))
    return x.masked_fill(mask, 0)


def random_cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=x.device)
    cx = torch.randint(0, w, (b,), generator=gen, device=x.device)
    return cutout_at(x, cy, cx, size)


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding, horizontal flip, cutout; applied in that order."""

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        return random_cutout(x, self.cutout, gen)


def resolve_flip(cfg: "DataConfig") -> bool:
    """``data.flip`` when set, else the dataset's default (off for digit-like sets)."""
    if cfg.flip is not None:
        return bool(cfg.flip)
    from .base import get_dataset

    return get_dataset(cfg.name).default_flip


def build_augment(cfg: "DataConfig", info: Any = None) -> Optional[Augment]:
    """The training augmentation ``cfg`` asks for, or None when it asks for none."""
    aug = Augment(crop_padding=cfg.crop_padding, flip=resolve_flip(cfg), cutout=cfg.cutout)
    return aug if aug.active else None
