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


def crop_at(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int,
            flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-example crops ``padded[b, :, dy[b]:dy[b]+h, dx[b]:dx[b]+w]`` (mirrored left-right where
    ``flip[b]``) as ONE gather over the flattened images: no Python loop, one kernel."""
    b, c, hp, wp = padded.shape
    dev = padded.device
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    if flip is not None:
        cols = torch.where(flip.view(b, 1, 1), (w - 1) - cols, cols)
    flat = (dy.view(b, 1, 1) + rows) * wp + dx.view(b, 1, 1) + cols  # [B, h, w] positions in the padded image
    idx = flat.view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, idx).view(b, c, h, w)


def crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and/or random horizontal flip, fused in one gather."""
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=dev)
    else:
        padded = x
        dy = dx = torch.zeros(b, dtype=torch.long, device=dev)
    mirror = torch.rand(b, generator=gen, device=dev) < 0.5 if flip else None
    return crop_at(padded, dy, dx, h, w, mirror)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and take a random same-size crop per example."""
    return x if pad <= 0 else crop_flip(x, pad, False, gen)


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
        if self.crop_padding > 0 or self.flip:
            x = crop_flip(x, self.crop_padding, self.flip, gen)
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
