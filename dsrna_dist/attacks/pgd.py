"""PGD (Madry et al. 2018) in l_inf or l_2 with random start and restarts.

Stronger than the textbook loop in one cheap way: each example keeps the first iterate that
fools the model (checked on the logits every step computes anyway) instead of only the last
iterate, and a restart only re-attacks examples no earlier restart has broken. The random
start of example i in restart r is drawn from a generator seeded by (seed, i, r).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ATTACKS, Attack, AttackError, check_finite_eps, flat_norm, input_grad, per_example_rand, project


@ATTACKS.register("pgd")
class PGD(Attack):
    def validate(self) -> None:
        check_finite_eps(self.cfg, self.label)
        if self.cfg.steps < 1:
            raise AttackError(f"{self.label}: steps must be >= 1")
        if self.cfg.step_size <= 0:
            raise AttackError(f"{self.label}: step_size must be > 0")

    def random_start(self, x: torch.Tensor, indices: Sequence[int], restart: int) -> torch.Tensor:
        shape = x.shape[1:]
        if self.norm == "inf":
            u = per_example_rand(shape, self.seed, indices, 1 + restart, x.device)
            delta = (2 * u - 1) * self.eps
        else:  # uniform direction, radius uniform in [0, eps] (as torchattacks' PGDL2)
            d = per_example_rand(shape, self.seed, indices, 1 + restart, x.device, normal=True)
            r = per_example_rand((1,), self.seed, indices, 1001 + restart, x.device).flatten()
            delta = d / flat_norm(d, "2").clamp_min(1e-12).view(-1, *([1] * len(shape))) * (r * self.eps).view(
                -1, *([1] * len(shape)))
        return project(x + delta.to(x.dtype), x, self.eps, self.norm)

    def step(self, x_adv: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = self.cfg.step_size
        if self.norm == "inf":
            return x_adv + a * g.sign()
        return x_adv + a * g / flat_norm(g, "2").clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        loss = getattr(self.cfg, "loss", "ce")
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for r in range(self.cfg.restarts):
            todo = (~fooled).nonzero().flatten()
            if not len(todo):
                break
            xs, ys = x[todo], y[todo]
            idx = [indices[i] for i in todo.tolist()]
            x_adv = self.random_start(xs, idx, r) if self.cfg.random_start else xs.clone()
            hit = torch.zeros(len(xs), dtype=torch.bool, device=x.device)
            found = xs.clone()
            for _ in range(self.cfg.steps):
                g, logits = input_grad(model, x_adv, ys, loss)
                new = (logits.argmax(1) != ys) & ~hit
                found[new] = x_adv[new]
                hit |= new
                x_adv = project(self.step(x_adv, g), xs, self.eps, self.norm)
            new = (model(x_adv).argmax(1) != ys) & ~hit
            found[new] = x_adv[new]
            hit |= new
            # unbroken examples keep the last iterate of the last restart that ran
            found[~hit] = x_adv[~hit]
            best[todo] = found
            fooled[todo] = hit
        return best
