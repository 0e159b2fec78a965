"""Verification-based evaluation (paper Tables 5-6) and its empirical counterpart.

``certify_batch`` asks the bound engine (dsrna_dist.bounds.certified_radius: a per-example
log-space bisection on eps, CNN-Cert style) for the largest eps whose margin lower bound is
positive: against every other class (untargeted) and against one random class per example
(CNN-Cert's "certified lower bound"; the target is seeded by (seed, example index) so it does
not depend on batching or ranks). ``min_adversarial_eps`` is the attack-side upper bound of
the same quantity: the smallest eps at which PGD finds an adversarial example (bisection on
eps); a sound certificate can never exceed it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import AttackConfig
from .base import example_seed


def random_targets(y: torch.Tensor, num_classes: int, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """One target class != y per example, uniform over the others, seeded per example index."""
    g = torch.Generator()
    offs = []
    for i in indices:
        g.manual_seed(example_seed(seed, int(i), salt=7919))
        offs.append(int(torch.randint(1, num_classes, (1,), generator=g)))
    return (y + torch.tensor(offs, device=y.device)) % num_classes


def certify_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *,
                  methods: Sequence[str], norms: Sequence[str], steps: int, eps_init: float,
                  random_target: bool, seed: int, num_classes: int) -> List[Dict]:
    """certify.jsonl records (index, label, method, norm, radius, radius_target, target)."""
    from ..bounds import BoundedModel, certified_radius

    bm = model if isinstance(model, BoundedModel) else BoundedModel(model)
    tgt = random_targets(y, num_classes, seed, indices) if random_target and num_classes > 1 else None
    out: List[Dict] = []
    with torch.no_grad():
        for method in methods:
            for norm in norms:
                r = certified_radius(bm, x, y, norm, method, steps, eps_init)
                rt = certified_radius(bm, x, y, norm, method, steps, eps_init, target=tgt) if tgt is not None else None
                for k, i in enumerate(indices):
                    out.append({"index": int(i), "label": int(y[k]), "method": method, "norm": norm,
                                "radius": float(r[k]),
                                "radius_target": float(rt[k]) if rt is not None else None,
                                "target": int(tgt[k]) if tgt is not None else None})
    return out


def min_adversarial_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "inf", *,
                        eps_max: float = 1.0, bisection_steps: int = 12, pgd: Optional[AttackConfig] = None,
                        seed: int = 0) -> torch.Tensor:
    """[B] smallest eps (up to the bisection resolution) at which PGD breaks each example;
    +inf where even ``eps_max`` fails, 0 where the clean input is already misclassified.

    The step size scales with eps (eps / 4), so every probe is an equally strong attack.
    """
    from . import build_attack

    base = pgd or AttackConfig(name="pgd", steps=20, restarts=1, random_start=False)
    idx = list(range(len(x)))

    def broken(eps: torch.Tensor) -> torch.Tensor:
        res = torch.zeros(len(x), dtype=torch.bool)
        for e in sorted(set(eps.tolist())):  # group examples probing the same eps
            sel = (eps == e).nonzero().flatten()
            atk = build_attack(replace(base, eps=float(e), norm=norm, step_size=float(e) / 4), seed)
            xa = atk(model, x[sel], y[sel], [idx[i] for i in sel.tolist()])
            with torch.no_grad():
                res[sel] = model(xa).argmax(1) != y[sel]
        return res

    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    lo = torch.zeros(len(x), dtype=torch.float64)
    hi = torch.full((len(x),), float(eps_max), dtype=torch.float64)
    top = broken(hi)
    for _ in range(bisection_steps):
        mid = (lo + hi) / 2
        b = broken(mid)
        hi = torch.where(b, mid, hi)
        lo = torch.where(b, lo, mid)
    out = torch.where(top, hi, torch.full_like(hi, math.inf))
    return torch.where(clean_wrong, torch.zeros_like(out), out)
