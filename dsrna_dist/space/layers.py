"""Small layers shared by the supernet and derived networks.

Normalization lives inside every model, so inputs, attack radii and certified bounds are all
in [0, 1] pixel units.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics as (non-trainable) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} entries, std {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]
