"""Square Attack (Andriushchenko et al. 2020), l_inf, score-based: a black-box attack.

Why it is here: a gradient-free attack is the control of the gradient-masking checks (a model
whose gradients lie defeats PGD but not a random search on its outputs; "black-box beats
white-box" is a masking symptom). It only reads logits, never ``.backward()``.

Algorithm (the paper's l_inf version): start from vertical stripes of +-eps; then, for
``steps`` queries, redraw one random square window (side from the paper's schedule of p, the
fraction of pixels changed) to +-eps per channel and keep the change when the margin loss
z_y - max_{j != y} z_j goes down; an example stops once it is misclassified. All randomness of
example i comes from one generator seeded by (seed, i): results do not depend on batching or
ranks (unlike AutoAttack's Square, seeded per call).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from .base import ATTACKS, Attack, AttackError, check_finite_eps, example_seed, margin


def p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels in the square at query ``it`` (the paper's piecewise halving, rescaled to the budget)."""
    it = int(it / n_queries * 10000)
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2 ** k
    return p_init / 512


@ATTACKS.register("square")
class SquareLinf(Attack):
    blackbox = True

    def validate(self) -> None:
        check_finite_eps(self.cfg, self.label)
        if self.cfg.norm != "inf":
            raise AttackError(f"{self.label}: square is implemented for norm 'inf' only")
        if self.cfg.steps < 1:
            raise AttackError(f"{self.label}: steps (= queries) must be >= 1")

    def _gens(self, indices: Sequence[int]) -> List[torch.Generator]:
        gens = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed(example_seed(self.seed, int(i), salt=4242))
            gens.append(g)
        return gens

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        eps, n_q, p_init = self.eps, int(self.cfg.steps), 0.8
        b, c, h, w = x.shape
        gens = self._gens(indices)
        stripes = torch.stack([(torch.randint(0, 2, (c, 1, w), generator=g) * 2 - 1).float() for g in gens])
        x_best = (x + eps * stripes.to(x)).clamp(0, 1)
        loss = margin(model(x_best), y)
        for it in range(1, n_q):
            active = (loss > 0).nonzero().flatten()
            if not len(active):
                break
            s = max(int(round(math.sqrt(p_schedule(p_init, it, n_q) * h * w))), 1)
            s = min(s, h - 1, w - 1) if min(h, w) > 1 else 1
            xa, xb, ya = x[active], x_best[active], y[active]
            new = xb.clone()
            for k, j in enumerate(active.tolist()):
                g = gens[j]
                r = int(torch.randint(0, h - s + 1, (1,), generator=g))
                q = int(torch.randint(0, w - s + 1, (1,), generator=g))
                win_x, win_b = xa[k, :, r:r + s, q:q + s], xb[k, :, r:r + s, q:q + s]
                for _ in range(10):  # redraw until the window actually changes (as the reference does)
                    sign = (torch.randint(0, 2, (c, 1, 1), generator=g) * 2 - 1).to(x)
                    cand = (win_x + eps * sign).clamp(0, 1)
                    if (cand - win_b).abs().sum() > 1e-7:
                        break
                new[k, :, r:r + s, q:q + s] = cand
            new_loss = margin(model(new), ya)
            better = new_loss < loss[active]
            upd = active[better]
            x_best[upd] = new[better]
            loss[upd] = new_loss[better]
        return x_best
