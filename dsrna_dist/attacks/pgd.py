"""PGD (Madry et al. 2018) in l_inf or l_2 with random start and restarts.

Stronger than the textbook loop in one cheap way: each example keeps the first iterate that
fools the model (checked on the logits every step computes anyway) instead of only the last
iterate, and a restart only re-attacks examples no earlier restart has broken. The random
start of example i in restart r is drawn from a generator seeded by (seed, i, r).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

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

    def _noise(self, x: torch.Tensor, indices: Optional[Sequence[int]], salt: int, shape: Sequence[int],
               normal: bool = False) -> torch.Tensor:
        """Per-example seeded noise (evaluation), or one draw from the global torch stream when
        ``indices`` is None (training: the per-rank stream that checkpoints capture and restore)."""
        if indices is None:
            draw = torch.randn if normal else torch.rand
            return draw((len(x), *shape)).to(x.device)
        return per_example_rand(shape, self.seed, indices, salt, x.device, normal=normal)

    def random_start(self, x: torch.Tensor, indices: Optional[Sequence[int]], restart: int,
                     eps: Optional[float] = None) -> torch.Tensor:
        eps = self.eps if eps is None else float(eps)
        shape = x.shape[1:]
        if self.norm == "inf":
            u = self._noise(x, indices, 1 + restart, shape)
            delta = (2 * u - 1) * eps
        else:  # uniform direction, radius uniform in [0, eps] (as torchattacks' PGDL2)
            d = self._noise(x, indices, 1 + restart, shape, normal=True)
            r = self._noise(x, indices, 1001 + restart, (1,)).flatten()
            delta = d / flat_norm(d, "2").clamp_min(1e-12).view(-1, *([1] * len(shape))) * (r * eps).view(
                -1, *([1] * len(shape)))
        return project(x + delta.to(x.dtype), x, eps, self.norm)

    def step(self, x_adv: torch.Tensor, g: torch.Tensor, step_size: Optional[float] = None) -> torch.Tensor:
        a = self.cfg.step_size if step_size is None else float(step_size)
        if self.norm == "inf":
            return x_adv + a * g.sign()
        return x_adv + a * g / flat_norm(g, "2").clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))

    def ascend(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
               objective: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
               eps: Optional[float] = None, step_size: Optional[float] = None) -> torch.Tensor:
        """PGD as adversarial *training* uses it (Madry et al. 2018): every example attacked, the
        last iterate returned (the high-loss point, not the first one that fools), no restarts,
        random start from the global torch stream, the model's mode left as the caller set it.
        ``eps``/``step_size`` override the config (eps warm-up); ``objective(logits, y)`` (summed)
        replaces the configured loss (TRADES' KL term)."""
        eps = self.eps if eps is None else float(eps)
        x = x.detach()
        if eps <= 0:
            return x.clone()
        a = self.cfg.step_size * eps / self.eps if step_size is None else float(step_size)
        loss = objective if objective is not None else getattr(self.cfg, "loss", "ce")
        x_adv = self.random_start(x, None, 0, eps) if self.cfg.random_start else x.clone()
        for _ in range(self.cfg.steps):
            g, _ = input_grad(model, x_adv, y, loss)
            x_adv = project(self.step(x_adv, g, a), x, eps, self.norm)
        return x_adv.detach()

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
            # Only the examples not yet broken are stepped: a broken one keeps its first fooling
            # iterate, so stepping it further is wasted work (in eval mode examples do not
            # interact). On a natural network this makes PGD-100 cost about PGD-3.
            act = torch.arange(len(xs), device=x.device)
            for _ in range(self.cfg.steps):
                g, logits = input_grad(model, x_adv, ys[act], loss)
                new = logits.argmax(1) != ys[act]
                found[act[new]] = x_adv[new]
                hit[act[new]] = True
                keep = ~new
                act, x_adv, g = act[keep], x_adv[keep], g[keep]
                if not len(act):
                    break
                x_adv = project(self.step(x_adv, g), xs[act], self.eps, self.norm)
            if len(act):
                new = model(x_adv).argmax(1) != ys[act]
                found[act[new]] = x_adv[new]
                hit[act[new]] = True
                # unbroken examples keep the last iterate of the last restart that ran
                found[act[~new]] = x_adv[~new]
            best[todo] = found
            fooled[todo] = hit
        return best
