"""Carlini & Wagner L2 (2017), untargeted, in tanh space with Adam.

minimise ||x' - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa),  x' = (tanh(w) + 1) / 2.

Each example keeps the smallest-l2 iterate that is misclassified; an example with no such
iterate comes back *clean* and therefore counts as not fooled. The best other-class logit is
found by masking class y with -inf (not by zeroing it: that bug in torchattacks makes the
objective flat when every logit is negative). Optional binary search over c per example
(``binary_search_steps`` > 1), as in the paper: success -> smaller c, failure -> larger c.
``eps`` = 0 means unbounded (paper style: robust accuracy is the fraction C&W cannot break at
any l2 size within the iteration budget); ``eps`` > 0 only accepts adversarials with
||x' - x||_2 <= eps.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import AttackConfig
from .base import ATTACKS, Attack, AttackError, margin


class _Adam:
    """Plain Adam on one tensor (torch.optim's first step imports torch._dynamo: seconds)."""

    def __init__(self, w: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.w, self.lr, self.b1, self.b2, self.eps = w, lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.t = 0

    @torch.no_grad()
    def step(self, g: torch.Tensor) -> None:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        self.w.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


@ATTACKS.register("cw")
class CarliniWagnerL2(Attack):
    def __init__(self, cfg: AttackConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.bounded = cfg.eps > 0

    @property
    def norm(self) -> str:
        return "2"

    def validate(self) -> None:
        if self.cfg.steps < 1:
            raise AttackError(f"{self.label}: steps must be >= 1")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        cfg = self.cfg
        b = len(x)
        dev = x.device
        c = torch.full((b,), float(cfg.c), device=dev)
        lo = torch.zeros(b, device=dev)
        hi = torch.full((b,), float("inf"), device=dev)
        best_l2 = torch.full((b,), float("inf"), device=dev)
        best = x.clone()
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(max(1, getattr(cfg, "binary_search_steps", 1))):
            w = w0.clone().requires_grad_(True)
            adam = _Adam(w, cfg.lr)
            success = torch.zeros(b, dtype=torch.bool, device=dev)
            for it in range(cfg.steps + 1):
                with torch.enable_grad():
                    xa = (torch.tanh(w) + 1) / 2
                    logits = model(xa)
                    l2sq = (xa - x).pow(2).flatten(1).sum(1)
                    f = margin(logits, y).clamp_min(-cfg.kappa)
                    loss = (l2sq + c * f).sum()
                    if it < cfg.steps:  # the last pass only scores the final iterate
                        (g,) = torch.autograd.grad(loss, w)
                l2 = l2sq.detach().sqrt()
                ok = logits.detach().argmax(1) != y
                if self.bounded:
                    ok &= l2 <= self.eps
                success |= ok
                better = ok & (l2 < best_l2)
                best_l2[better] = l2[better]
                best[better] = xa.detach()[better]
                if it < cfg.steps:
                    adam.step(g)
            # binary search on c, per example
            hi = torch.where(success, torch.minimum(hi, c), hi)
            lo = torch.where(success, lo, torch.maximum(lo, c))
            c = torch.where(torch.isfinite(hi), (lo + hi) / 2, c * 10)
        return best
