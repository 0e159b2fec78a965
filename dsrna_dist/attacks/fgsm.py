"""FGSM (Goodfellow et al. 2015): one step of size eps along the sign (l_inf) or the direction
(l_2, "FGM") of the loss gradient, then clip to [0, 1].

For a binary linear model this *is* the worst case in the eps ball intersected with the box
(the problem separates per coordinate), which the tests check against a linear program.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ATTACKS, Attack, check_finite_eps, flat_norm, input_grad, project


@ATTACKS.register("fgsm")
class FGSM(Attack):
    def validate(self) -> None:
        check_finite_eps(self.cfg, self.label)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        g, _ = input_grad(model, x, y, getattr(self.cfg, "loss", "ce"))
        if self.norm == "inf":
            step = self.eps * g.sign()
        else:
            step = self.eps * g / flat_norm(g, "2").clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        return project(x + step, x, self.eps, self.norm)
