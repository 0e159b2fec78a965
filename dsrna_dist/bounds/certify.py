"""Certified radius by bisection (CNN-Cert style), batched over examples.

For each example: start at ``eps_init``; while no bracket is known, multiply/divide eps by e
(steps of 1 in log space); once one certified and one uncertified eps are known, bisect in
log space. The result is the largest eps at which the margin lower bound was > 0 for every
class j != y (untargeted) or for the one ``target`` class; 0 when none was.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .graph import BoundedModel


@torch.no_grad()
def certified_radius(model: Union[nn.Module, BoundedModel], x: Tensor, y: Tensor, norm: str = "inf",
                     method: str = "crown-ibp", steps: int = 15, eps_init: float = 0.05,
                     target: Optional[Tensor] = None, x_min: float = 0.0, x_max: float = 1.0,
                     max_memory_mb: float = 256.0) -> Tensor:
    """[B] certified radii (pixel units) of ``model`` at ``x`` with labels ``y``.

    ``model``: a module (traced here) or a :class:`BoundedModel` (reuse it across batches).
    ``target``: [B] class per example for the CNN-Cert random-target radius; None: untargeted.
    """
    if steps < 1 or eps_init <= 0:
        raise ValueError(f"certified_radius: need steps >= 1 and eps_init > 0 (got {steps}, {eps_init})")
    bm = model if isinstance(model, BoundedModel) else BoundedModel(model, max_memory_mb=max_memory_mb)
    B = x.shape[0]
    dt = torch.float64
    log_eps = torch.full((B,), math.log(eps_init), dtype=dt, device=x.device)
    lo = torch.full_like(log_eps, -math.inf)  # largest certified log-eps
    hi = torch.full_like(log_eps, math.inf)   # smallest uncertified log-eps
    for _ in range(steps):
        eps = log_eps.exp().to(x.dtype)
        m = bm.margin_lower_bound(x, y, eps, norm, method, x_min, x_max, target)
        if target is None:
            m = m.scatter(1, y.view(-1, 1).long(), math.inf)
            ok = m.min(dim=1).values > 0
        else:
            ok = m > 0
        # record the eps value actually checked (the float32 one), so the radius is certified
        lo = torch.where(ok, torch.maximum(lo, eps.to(dt).log()), lo)
        hi = torch.where(ok, hi, torch.minimum(hi, log_eps))
        both = torch.isfinite(lo) & torch.isfinite(hi)
        log_eps = torch.where(both, (lo + hi) / 2,
                              torch.where(torch.isfinite(lo), lo + 1.0, hi - 1.0))
    radius = torch.where(torch.isfinite(lo), lo.exp(), torch.zeros_like(lo))
    return radius.to(x.dtype)
