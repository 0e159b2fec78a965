"""Verification-based evaluation (paper Tables 5-6) and its empirical counterpart.

Certification, not an attack: it lived in ``dsrna_dist/attacks/certify.py`` (kept there as a
re-export for old imports) and belongs next to the radius search it drives (``certify.py``).

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
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..attacks.base import example_seed


def random_targets(y: torch.Tensor, num_classes: int, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """One target class != y per example, uniform over the others, seeded per example index."""
    g = torch.Generator()
    offs = []
    for i in indices:
        g.manual_seed(example_seed(seed, int(i), salt=7919))
        offs.append(int(torch.randint(1, num_classes, (1,), generator=g)))
    return (y + torch.tensor(offs, device=y.device)) % num_classes


#: bound methods from cheapest/loosest to dearest/tightest: each warm-starts the next
METHOD_ORDER = ("ibp", "crown-ibp", "crown")


def certify_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *,
                  methods: Sequence[str], norms: Sequence[str], steps: int, eps_init: float,
                  random_target: bool, seed: int, num_classes: int, rel_tol: float = 0.0,
                  eps_min: float = 1e-7, crown_passes: int = 0, crown_extra_passes: int = 0,
                  crown_extra_margin: float = 0.25) -> List[Dict]:
    """certify.jsonl records (index, label, method, norm, radius, radius_target, target,
    failed_at, failed_at_target: the smallest eps at which the method's bound was evaluated and
    did not certify, None where it never failed, so each radius states its own resolution;
    cpu_s: this process's CPU seconds for the method's searches in this norm, both target modes,
    per example of the batch, so a run resumed over many sessions still states its cost).

    Methods run cheapest first (IBP, CROWN-IBP, CROWN) and each search starts from the radius
    the previous one certified (a sound certificate whichever bound proved it): the easy part
    of the bracket is settled cheaply, and the radii are ordered IBP <= CROWN-IBP <= CROWN on
    every example. ``rel_tol`` > 0: bisect each example to that relative resolution (at most
    ``steps`` probes); 0: exactly ``steps`` probes (CNN-Cert). ``crown_passes`` > 0: full CROWN
    runs at most that many full passes per example, ``crown_extra_passes`` more for unbracketed
    ones with more than ``crown_extra_margin`` of the clean margin left (dsrna_dist.bounds.certify);
    its records add margin_left / margin_left_target (None for the other methods).

    Across norms, a radius certified in one norm certifies a ball of the other that it contains
    (the l_2 ball of radius r lies in the l_inf ball of radius r, and the l_inf ball of radius
    r / sqrt(d) in the l_2 ball of radius r): it warm-starts the same method's search in the
    norm that comes later, and the reported radius is never below it (sound whichever norm's
    bound proved it; without it the bisection's path can end an l_2 search below the l_inf
    radius of the same example)."""
    from .certify import certified_radius
    from .graph import BoundedModel

    bad = [m for m in methods if m not in METHOD_ORDER]
    if bad:
        raise ValueError(f"certify methods: unknown {bad[0]!r}; valid: {', '.join(METHOD_ORDER)}")
    bm = model if isinstance(model, BoundedModel) else BoundedModel(model)
    tgt = random_targets(y, num_classes, seed, indices) if random_target and num_classes > 1 else None
    out: List[Dict] = []
    kw = dict(steps=steps, eps_init=eps_init, rel_tol=rel_tol, eps_min=eps_min)
    done: Dict[str, Dict[str, tuple]] = {}
    cpu: Dict[tuple, float] = {}
    d = float(x[0].numel())

    def implied(norm: str, method: str, i: int):  # radius in ``norm`` implied by the other norm's
        for other, rr in done.items():
            if other != norm and method in rr and rr[method][i] is not None:
                return rr[method][i] * (1.0 if norm == "2" else d ** -0.5)
        return None

    def up(a, b):
        return b if a is None else (a if b is None else torch.maximum(a, b))

    with torch.no_grad():
        for norm in norms:
            prev = prev_t = None
            radii = {}
            for method in sorted(set(methods), key=METHOD_ORDER.index):
                prev, prev_t = up(prev, implied(norm, method, 0)), up(prev_t, implied(norm, method, 1))
                mkw = dict(kw, crown_passes=crown_passes, crown_extra_passes=crown_extra_passes,
                           crown_extra_margin=crown_extra_margin) if method == "crown" else kw
                info: Dict = {}
                info_t: Dict = {}
                t0 = time.process_time()
                r, fr = certified_radius(bm, x, y, norm, method, lower=prev, bracket=True, info=info, **mkw)
                rt, ft = certified_radius(bm, x, y, norm, method, target=tgt, lower=prev_t, bracket=True,
                                          info=info_t, **mkw) if tgt is not None else (None, None)
                cpu[(method, norm)] = (time.process_time() - t0) / len(indices)
                if prev is not None:  # the warm start keeps the cheaper certificate
                    r = torch.maximum(r, prev)
                    rt = torch.maximum(rt, prev_t) if rt is not None else None
                prev, prev_t = r, rt
                radii[method] = (r, rt, fr, ft, info.get("margin_left"), info_t.get("margin_left"))
            done[norm] = {m: v[:2] for m, v in radii.items()}
            for method in methods:
                r, rt, fr, ft, ml, mlt = radii[method]
                for k, i in enumerate(indices):
                    out.append({"index": int(i), "label": int(y[k]), "method": method, "norm": norm,
                                "radius": float(r[k]),
                                "radius_target": float(rt[k]) if rt is not None else None,
                                "target": int(tgt[k]) if tgt is not None else None,
                                "failed_at": _failed(fr[k], r[k]),
                                "failed_at_target": _failed(ft[k], rt[k]) if rt is not None else None,
                                "margin_left": _left(ml, k), "margin_left_target": _left(mlt, k),
                                "cpu_s": cpu[(method, norm)]})
    out.sort(key=lambda d: (methods.index(d["method"]), list(norms).index(d["norm"]), d["index"]))
    return out


def _left(left: Optional[torch.Tensor], k: int) -> Optional[float]:
    """The record's ``margin_left`` (full CROWN with passes: the last certified full pass's margin
    over the clean one, 1 where none certified), rounded for the record; None for other methods."""
    return None if left is None else round(float(left[k]), 4)


def _failed(failed: torch.Tensor, radius: torch.Tensor) -> Optional[float]:
    """The record's ``failed_at``: where the method's bound was evaluated and failed, above the
    radius (None: nowhere, i.e. the radius is a lower end of unknown resolution)."""
    f = float(failed)
    return f if math.isfinite(f) and f > float(radius) else None


def min_adversarial_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "inf", *,
                        eps_max: float = 1.0, bisection_steps: int = 12, steps: int = 20,
                        restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """[B] smallest eps (up to the bisection resolution) at which PGD breaks each example;
    +inf where even ``eps_max`` fails, 0 where the clean input is already misclassified.

    Every probe is a PGD attack (margin loss, ``steps`` steps of eps / 4, keeping any iterate
    that fools the model) with a per-example eps, all examples at once; the first restart
    starts at the clean input, each further one (``restarts`` > 1) at a uniform random point of
    the l_inf box / l_2 ball (seeded by ``seed``), until it breaks the example.
    (Its own loop rather than ``PGD.ascend``: the eps differs per example and every iterate
    counts, which the training-side ascend does not offer.)
    """
    from ..attacks.base import flat_norm, input_grad, project

    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def broken(eps: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for r in range(max(1, restarts)):
            hit |= one(eps, r)
            if hit.all():
                break
        return hit

    def one(eps: torch.Tensor, restart: int) -> torch.Tensor:
        e = eps.to(x.dtype)
        shape = (-1,) + (1,) * (x.dim() - 1)
        xa, hit = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if restart > 0:
            if norm == "inf":
                d = (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * e.view(shape).cpu()
            else:
                d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                d = d / flat_norm(d, "2").clamp_min(1e-12).view(shape)
                d = d * (torch.rand(len(x), generator=gen, dtype=x.dtype) * e.cpu()).view(shape)
            xa = project(x + d.to(x.device), x, e, norm)
        for _ in range(steps):
            g, logits = input_grad(model, xa, y, "margin")
            hit |= logits.argmax(1) != y
            if norm == "inf":
                step = g.sign()
            else:
                step = g / flat_norm(g, "2").clamp_min(1e-12).view(shape)
            xa = project(xa + (e / 4).view(shape) * step, x, e, norm)
        with torch.no_grad():
            hit |= model(xa).argmax(1) != y
        return hit

    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    lo = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    hi = torch.full((len(x),), float(eps_max), dtype=torch.float64, device=x.device)
    top = broken(hi)
    for _ in range(bisection_steps):
        mid = (lo + hi) / 2
        b = broken(mid)
        hi = torch.where(b, mid, hi)
        lo = torch.where(b, lo, mid)
    out = torch.where(top, hi, torch.full_like(hi, math.inf))
    return torch.where(clean_wrong, torch.zeros_like(out), out)
