"""Certified radius by bisection (CNN-Cert style), batched over examples.

For each example: start at ``eps_init``; while no bracket is known, multiply/divide eps by e
(steps of 1 in log space); once one certified and one uncertified eps are known, bisect in
log space. The result is the largest eps at which the margin lower bound was > 0 for every
class j != y (untargeted) or for the one ``target`` class; 0 when none was.

Resolution: ``rel_tol = 0`` runs exactly ``steps`` probes per example (CNN-Cert: 15 from 0.05,
which leaves radii on a coarse grid); ``rel_tol > 0`` probes each example until its bracket
satisfies ``hi / lo <= 1 + rel_tol`` (so the radius is within that factor of the largest eps
this bound certifies on the bisection path), at most ``steps`` probes, and stops an example
once ``hi <= eps_min`` (radius 0: nothing certified above eps_min) or once ``lo`` covers the
whole input range. Only unfinished examples are probed.

Warm starts, both sound: ``lower`` (a radius certified by a sound method, e.g. a cheaper bound
run first) starts the bracket's certified end; ``upper`` (an eps at which an attack found an
adversarial example) its uncertified end -- no sound bound can certify there.

Reuse across probes: every probe below the smallest uncertified eps so far (``hi``) is on a
subset of the input set probed there, so the bounds of every relaxed node proven at ``hi`` are
valid now; they are intersected in (``prior``), and neurons proven stable there are not
recomputed by full CROWN.

Full CROWN with ``crown_passes`` > 0 (the affordable path, :func:`_crown_radius_passes`): a
full-CROWN pass (every intermediate bound by a backward pass) costs minutes on a 5-cell DARTS
net, so each example gets at most ``crown_passes`` of them; after a pass at eps_p fails, the
search goes on *below* eps_p with one backward pass per probe (the final specification only):
the intermediate bounds are eps_p's boxes and eps_p's full-depth linear bounds re-concretized
at the probed eps (``centre - eps * dual norm``: the relaxations chosen at eps_p hold on every
smaller set), intersected with IBP. Sound at every probe; at eps_p it equals full CROWN, below
it is looser than a fresh full-CROWN pass would be (the relaxations are eps_p's), so the radius
is at most full CROWN's (up to the search resolution) and usually close to it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from .base import Interval
from .graph import BoundedModel


def _take(boxes: Dict, idx: Tensor) -> Dict:
    return {n: Interval(b.lower[idx], b.upper[idx]) for n, b in boxes.items()}


def _take_lin(lin: Dict, idx: Tensor) -> Dict:
    return {n: [t[idx] for t in v] for n, v in lin.items()}


def _certified(bm: BoundedModel, x: Tensor, y: Tensor, eps: Tensor, norm: str, tg: Optional[Tensor],
               x_min: float, x_max: float, **kw) -> Tensor:
    m = bm.margin_lower_bound(x, y, eps, norm, "crown", x_min, x_max, tg, **kw)
    if tg is None:
        return m.scatter(1, y.view(-1, 1).long(), math.inf).min(dim=1).values > 0
    return m > 0


def _crown_radius_passes(bm: BoundedModel, x: Tensor, y: Tensor, norm: str, target: Optional[Tensor],
                         lo: Tensor, hi: Tensor, passes: int, steps: int, tol: float, log_init: float,
                         log_cap: float, log_min: float, x_min: float, x_max: float) -> Tensor:
    """Log-eps lower ends (certified) after at most ``passes`` full-CROWN passes per example,
    each followed by up to ``steps`` one-backward probes below it (see the module docstring)."""
    both = torch.isfinite(lo) & torch.isfinite(hi)
    grow = math.log(1.5)  # the reuse below a failed pass is good within a small factor of its eps
    init = torch.full_like(lo, log_init)
    ref = torch.where(both, (lo + hi) / 2,
                      torch.where(torch.isfinite(hi), torch.minimum(hi - 1.0, init),
                                  torch.where(torch.isfinite(lo), lo + grow, init)))
    for _ in range(passes):
        done = (torch.isfinite(lo) & torch.isfinite(hi) & (hi - lo <= tol)) | (hi <= log_min) | (lo >= log_cap)
        act = (~done).nonzero().flatten()
        if act.numel() == 0:
            break
        eps = ref[act].exp().to(x.dtype)
        tg = target[act] if target is not None else None
        keep: Dict = {}
        keep_lin: Dict = {}
        ok = _certified(bm, x[act], y[act], eps, norm, tg, x_min, x_max, keep=keep, keep_lin=keep_lin)
        le = eps.to(lo.dtype).log()
        lo[act] = torch.where(ok, torch.maximum(lo[act], le), lo[act])
        hi[act] = torch.where(ok, hi[act], torch.minimum(hi[act], le))
        bad = (~ok).nonzero().flatten()
        if bad.numel():  # one-backward probes below the failed eps, reusing its bounds
            rows = act[bad]
            prior, prior_lin = _take(keep, bad), _take_lin(keep_lin, bad)
            ilo, ihi = lo[rows].clone(), le[bad].clone()
            for _ in range(steps):
                fin = torch.isfinite(ilo)
                live = ~(fin & (ihi - ilo <= tol)) & ~(~fin & (ihi <= log_min))
                sub = live.nonzero().flatten()
                if sub.numel() == 0:
                    break
                mid = torch.where(fin[sub], (ilo[sub] + ihi[sub]) / 2, ihi[sub] - 1.0)
                e = mid.exp().to(x.dtype)
                r = rows[sub]
                okp = _certified(bm, x[r], y[r], e, norm, target[r] if target is not None else None, x_min, x_max,
                                 prior=_take(prior, sub), prior_lin=_take_lin(prior_lin, sub), frozen=True)
                le2 = e.to(lo.dtype).log()
                ilo[sub] = torch.where(okp, torch.maximum(ilo[sub], le2), ilo[sub])
                ihi[sub] = torch.where(okp, ihi[sub], torch.minimum(ihi[sub], le2))
            lo[rows] = torch.maximum(lo[rows], ilo)
        # next full pass: bisect the bracket; grow by 1.5x while nothing failed; e^2 lower when
        # not even the probes below a failed pass certified anything
        both = torch.isfinite(lo) & torch.isfinite(hi)
        ref = torch.where(both, (lo + hi) / 2, torch.where(torch.isfinite(lo), lo + grow, hi - 2.0))
    return lo


@torch.no_grad()
def certified_radius(model: Union[nn.Module, BoundedModel], x: Tensor, y: Tensor, norm: str = "inf",
                     method: str = "crown-ibp", steps: int = 15, eps_init: float = 0.05,
                     target: Optional[Tensor] = None, x_min: float = 0.0, x_max: float = 1.0,
                     max_memory_mb: float = 256.0, rel_tol: float = 0.0, eps_min: float = 1e-7,
                     lower: Optional[Tensor] = None, upper: Optional[Tensor] = None,
                     reuse: bool = True, crown_passes: int = 0) -> Tensor:
    """[B] certified radii (pixel units) of ``model`` at ``x`` with labels ``y``.

    ``model``: a module (traced here) or a :class:`BoundedModel` (reuse it across batches).
    ``target``: [B] class per example for the CNN-Cert random-target radius; None: untargeted.
    ``rel_tol``/``eps_min``/``lower``/``upper``/``reuse``/``crown_passes``: see the module
    docstring (``crown_passes`` > 0, method "crown": at most that many full-CROWN passes per
    example, ``steps`` one-backward probes after each, resolution ``rel_tol`` or 1e-3 if 0).
    """
    if steps < 1 or eps_init <= 0:
        raise ValueError(f"certified_radius: need steps >= 1 and eps_init > 0 (got {steps}, {eps_init})")
    if rel_tol < 0 or eps_min <= 0:
        raise ValueError(f"certified_radius: need rel_tol >= 0 and eps_min > 0 (got {rel_tol}, {eps_min})")
    bm = model if isinstance(model, BoundedModel) else BoundedModel(model, max_memory_mb=max_memory_mb)
    B = x.shape[0]
    dt = torch.float64
    dev = x.device
    lo = torch.full((B,), -math.inf, dtype=dt, device=dev)  # largest certified log-eps
    hi = torch.full((B,), math.inf, dtype=dt, device=dev)   # smallest uncertified log-eps
    if lower is not None:
        lower = lower.to(dev, dt)
        lo = torch.where(lower > 0, lower.clamp(min=1e-300).log(), lo)
    if upper is not None:
        upper = upper.to(dev, dt)
        hi = torch.where(torch.isfinite(upper) & (upper > 0), upper.clamp(min=1e-300).log(), hi)
        hi = torch.where(upper <= 0, torch.full_like(hi, -math.inf), hi)  # clean input already wrong
    span = (x_max - x_min) * (math.sqrt(x[0].numel()) if norm == "2" else 1.0)
    log_cap, log_min = math.log(max(span, 1e-300)), math.log(eps_min)
    tol = math.log1p(rel_tol) if rel_tol > 0 else 0.0
    if method == "crown" and crown_passes > 0:
        lo = _crown_radius_passes(bm, x, y, norm, target, lo, hi, crown_passes, steps, tol or math.log1p(1e-3),
                                  math.log(eps_init), log_cap, log_min, x_min, x_max)
        return torch.where(torch.isfinite(lo), lo.exp(), torch.zeros_like(lo)).to(x.dtype)
    boxes: Optional[Dict] = None  # relaxed nodes' bounds at hi, per example (all B rows)
    probes = torch.zeros(B, dtype=torch.long, device=dev)

    def active() -> Tensor:
        done = probes >= steps
        if rel_tol > 0:
            both = torch.isfinite(lo) & torch.isfinite(hi)
            done |= both & (hi - lo <= tol)
            done |= (~torch.isfinite(lo)) & (hi <= log_min)
            done |= lo >= log_cap
        done |= hi == -math.inf
        return ~done

    while True:
        act = active().nonzero().flatten()
        if act.numel() == 0:
            break
        l, h = lo[act], hi[act]
        both = torch.isfinite(l) & torch.isfinite(h)
        log_eps = torch.where(both, (l + h) / 2,
                              torch.where(torch.isfinite(l), l + 1.0,
                                          torch.where(torch.isfinite(h), h - 1.0,
                                                      torch.full_like(l, math.log(eps_init)))))
        eps = log_eps.exp().to(x.dtype)
        # rows never uncertified yet hold (-inf, inf): nothing is intersected for them
        prior = _take(boxes, act) if (reuse and boxes is not None) else None
        keep: Dict = {}
        tg = target[act] if target is not None else None
        m = bm.margin_lower_bound(x[act], y[act], eps, norm, method, x_min, x_max, tg,
                                  prior=prior, keep=keep if reuse else None)
        if tg is None:
            m = m.scatter(1, y[act].view(-1, 1).long(), math.inf)
            ok = m.min(dim=1).values > 0
        else:
            ok = m > 0
        # record the eps value actually checked (the float32 one), so the radius is certified
        lo[act] = torch.where(ok, torch.maximum(l, eps.to(dt).log()), l)
        new_hi = ~ok & (log_eps < h)
        hi[act] = torch.where(new_hi, log_eps, h)
        probes[act] += 1
        if reuse and keep and new_hi.any():
            if boxes is None:
                boxes = {n: Interval(torch.full((B,) + tuple(b.lower.shape[1:]), -math.inf, dtype=b.lower.dtype,
                                                device=dev),
                                     torch.full((B,) + tuple(b.lower.shape[1:]), math.inf, dtype=b.lower.dtype,
                                                device=dev)) for n, b in keep.items()}
            rows = act[new_hi]
            for n, b in keep.items():
                boxes[n].lower[rows] = b.lower[new_hi]
                boxes[n].upper[rows] = b.upper[new_hi]
    radius = torch.where(torch.isfinite(lo), lo.exp(), torch.zeros_like(lo))
    return radius.to(x.dtype)
