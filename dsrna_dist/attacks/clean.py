"""The identity "attack": clean accuracy goes through the same code path as the real attacks."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ATTACKS, Attack


@ATTACKS.register("clean")
class Clean(Attack):
    bounded = False

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        return x
