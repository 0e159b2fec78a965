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
is at most full CROWN's (up to the search resolution). Those probes keep the failed pass's
relaxation slack, so on deep nets they certify little below a pass that failed far above the
radius: the passes are therefore placed by the margins they measure (:func:`_next_pass`: regula
falsi once a pass failed, a damped extrapolation of the margin's chord while all certified, each
such step capped at 2x while the margin has hardly fallen, since a flat stretch cannot tell a
cliff from a slow slope), and
the search reports, with ``bracket=True``, the smallest eps at which a full pass failed, i.e.
the resolution each radius actually has. Where no full pass failed, the last certified pass's
margin over the clean one (``info["margin_left"]``) says how far the radius may lie below the
bound's: near 0, the margin is spent and the radius is close; near 1 (a flat margin, stepped at
most 2x a pass), it may lie far above -- ``crown_extra_passes`` gives such examples more passes.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .base import Interval
from .graph import BoundedModel


def _take(boxes: Dict, idx: Tensor) -> Dict:
    return {n: Interval(b.lower[idx], b.upper[idx]) for n, b in boxes.items()}


def _take_lin(lin: Dict, idx: Tensor) -> Dict:
    return {n: [t[idx] for t in v] for n, v in lin.items()}


#: fraction of the way to the extrapolated root that a pass after certified ones goes
_AIM = 0.6
#: while the margin has fallen less than this fraction of its clean value, a pass after certified
#: ones goes at most _SMALL_STEP times further
_FALL = 0.25
_SMALL_STEP = 2.0
#: after a failure the next pass goes at least this fraction (log-eps) into the bracket
_FLOOR = 0.1


def _margin(bm: BoundedModel, x: Tensor, y: Tensor, eps: Tensor, norm: str, tg: Optional[Tensor],
            x_min: float, x_max: float, method: str = "crown", **kw) -> Tensor:
    """[B] the bound's margin: min over j != y of the lower bound of f_y - f_j (or f_y - f_t)."""
    m = bm.margin_lower_bound(x, y, eps, norm, method, x_min, x_max, tg, **kw)
    if tg is None:
        return m.scatter(1, y.view(-1, 1).long(), math.inf).min(dim=1).values
    return m


def _certified(bm: BoundedModel, x: Tensor, y: Tensor, eps: Tensor, norm: str, tg: Optional[Tensor],
               x_min: float, x_max: float, **kw) -> Tensor:
    return _margin(bm, x, y, eps, norm, tg, x_min, x_max, **kw) > 0


def _next_pass(lo: Tensor, hi: Tensor, m0: Tensor, ce: Tensor, cm: Tensor, pe: Tensor, pm: Tensor, fe: Tensor,
               fm: Tensor, tol: float) -> Tensor:
    """Log-eps of the next full pass, placed by the margins the passes measured (a guess: soundness
    never depends on it). A full-CROWN margin m(eps) falls ever faster as eps grows (more neurons
    turn unstable), so its chords bracket the radius. After a failed pass: the root of the chord
    from the last certified point (ce, cm) -- (0, clean margin) before any -- to the failure
    (fe, fm), at or below the radius (regula falsi). With certified passes only: the chord through
    the last two points (pe, pm), (ce, cm) extended to 0 lands *above* the radius, so the pass
    goes ``_AIM`` of the way there. A pass is worth placing below the radius: the one-backward
    probes below a failed pass keep its relaxations' slack and on deep nets certify little
    (measured on the grid's natural DARTS net: a pass failing at 3.8x the radius-to-be left its
    probes at margin -1.3 where full CROWN had +3.9), while a fixed 1.5x step from eps_init left
    the radii at 1.5 eps_init, half their CROWN value."""
    both = torch.isfinite(lo) & torch.isfinite(hi)
    mid = torch.where(both, (lo + hi) / 2, torch.where(torch.isfinite(lo), lo + math.log(1.5), hi - 2.0))
    failed = torch.isfinite(fe)
    root_f = ce + cm * (fe - ce) / (cm - fm).clamp(min=1e-30)
    slope = (pm - cm) / (ce - pe).clamp(min=1e-300)
    root_c = torch.where(slope > 0, ce + _AIM * cm / slope.clamp(min=1e-300), ce * math.e)
    root = torch.where(failed, root_f, root_c)
    ok = torch.isfinite(root) & (root > 0) & (failed | (ce > 0))
    lr = root.clamp(min=1e-300).log()
    # a margin that has fallen less than _FALL of the clean one says nothing about the curvature
    # beyond: the curve may be a cliff (the grid's natural PC-DARTS net: 6.91 clean, 6.49 at
    # 1e-4, 3.63 at 2e-4, -20.7 at 3e-4; the chord from the clean point overshot ~5x) or
    # near-linear (the tests' CNN: the same 6% fall with the radius 12x further), so each such
    # step is capped at _SMALL_STEP -- also after two certified passes on a flat stretch (the
    # natural DSRNA-Jacobian net: 2e-4 certified, the chord's pass at the e^2 cap failed); once
    # the margin has fallen that far the chord has seen the curvature and only e^2 caps it
    blind = ~failed & ((m0 - cm) < _FALL * m0)
    cap = torch.where(blind, torch.full_like(lo, math.log(_SMALL_STEP)), torch.full_like(lo, 2.0))
    lr = torch.minimum(lr, torch.where(torch.isfinite(lo), lo + cap, torch.full_like(lo, math.inf)))
    # regula falsi from a failure far below zero hugs the certified end: keep a tenth of the bracket
    lr = torch.where(failed & both, torch.maximum(lr, lo + _FLOOR * (hi - lo)), lr)
    # inside the bracket, clear of its ends by the resolution
    inside = (lr > lo + tol) & (lr < hi - tol)
    return torch.where(ok & inside, lr, mid)


def _crown_radius_passes(bm: BoundedModel, x: Tensor, y: Tensor, norm: str, target: Optional[Tensor],
                         lo: Tensor, hi: Tensor, passes: int, steps: int, tol: float, log_init: float,
                         log_cap: float, log_min: float, x_min: float, x_max: float, extra: int = 0,
                         extra_margin: float = 0.25) -> Tuple[Tensor, Tensor, Tensor]:
    """(log-eps certified lower end, log-eps of the smallest failed full pass, margin left) after
    at most ``passes`` full-CROWN passes per example, each failure followed by up to ``steps``
    one-backward probes below it (see the module docstring); passes placed by :func:`_next_pass`.

    ``extra`` more passes go to the examples the first ``passes`` left poorly resolved: no full
    pass failed (so no bracket) and the last certified one still held more than ``extra_margin``
    of the clean margin (the margin falls ever faster with eps, so much margin left means the
    radius may lie far above). Margin left: the last certified full pass's margin over the clean
    one (1 where no full pass certified), the resolution an unbracketed radius states."""
    both = torch.isfinite(lo) & torch.isfinite(hi)
    grow = math.log(1.5)
    init = torch.full_like(lo, log_init)
    # a warm start more than 10x below eps_init (a cheaper bound's tiny radius, e.g. CROWN-IBP's
    # 2e-7 on the grid's natural net, CROWN radius ~3e-4) says little: the first pass goes to
    # eps_init (if inside the bracket) instead of crawling up from it -- the margin's slope at so
    # small an eps is no guide either (there: 563 per unit eps at 3e-7, 11k-19k near the radius)
    weak = torch.isfinite(lo) & (lo < init - math.log(10.0)) & (init < hi)
    ref = torch.where(weak, init,
                      torch.where(both, (lo + hi) / 2,
                                  torch.where(torch.isfinite(hi), torch.minimum(hi - 1.0, init),
                                              torch.where(torch.isfinite(lo), lo + grow, init))))
    dt = lo.dtype
    # full-pass points per example (eps, margin), eps 0 being the clean margin (exact)
    m0 = _margin(bm, x, y, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device), norm, target,
                 x_min, x_max, method="ibp").to(dt)
    ce, cm = torch.zeros_like(lo), m0.clone()            # last certified full pass
    pe, pm = torch.zeros_like(lo), m0.clone()            # the certified point before it
    fe, fm = torch.full_like(lo, math.inf), torch.zeros_like(lo)  # smallest failed full pass
    for k in range(passes + extra):
        done = (torch.isfinite(lo) & torch.isfinite(hi) & (hi - lo <= tol)) | (hi <= log_min) | (lo >= log_cap)
        if k >= passes:  # extra passes: only unbracketed examples with much margin left
            done |= torch.isfinite(fe) | (cm <= extra_margin * m0)
        act = (~done).nonzero().flatten()
        if act.numel() == 0:
            break
        eps = ref[act].exp().to(x.dtype)
        tg = target[act] if target is not None else None
        keep: Dict = {}
        keep_lin: Dict = {}
        m = _margin(bm, x[act], y[act], eps, norm, tg, x_min, x_max, keep=keep, keep_lin=keep_lin).to(dt)
        ok = m > 0
        e64 = eps.to(dt)
        le = e64.log()
        lo[act] = torch.where(ok, torch.maximum(lo[act], le), lo[act])
        hi[act] = torch.where(ok, hi[act], torch.minimum(hi[act], le))
        up_c = ok & (e64 > ce[act])
        pe[act] = torch.where(up_c, ce[act], pe[act])
        pm[act] = torch.where(up_c, cm[act], pm[act])
        ce[act] = torch.where(up_c, e64, ce[act])
        cm[act] = torch.where(up_c, m, cm[act])
        dn_f = ~ok & (e64 < fe[act])
        fe[act] = torch.where(dn_f, e64, fe[act])
        fm[act] = torch.where(dn_f, m, fm[act])
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
                le2 = e.to(dt).log()
                ilo[sub] = torch.where(okp, torch.maximum(ilo[sub], le2), ilo[sub])
                ihi[sub] = torch.where(okp, ihi[sub], torch.minimum(ihi[sub], le2))
            lo[rows] = torch.maximum(lo[rows], ilo)
        ref = _next_pass(lo, hi, m0, ce, cm, pe, pm, fe, fm, tol)
    fail = torch.where(torch.isfinite(fe), fe.clamp(min=1e-300).log(), torch.full_like(fe, math.inf))
    return lo, fail, (cm / m0.clamp(min=1e-30)).clamp(max=1.0)


@torch.no_grad()
def certified_radius(model: Union[nn.Module, BoundedModel], x: Tensor, y: Tensor, norm: str = "inf",
                     method: str = "crown-ibp", steps: int = 15, eps_init: float = 0.05,
                     target: Optional[Tensor] = None, x_min: float = 0.0, x_max: float = 1.0,
                     max_memory_mb: float = 256.0, rel_tol: float = 0.0, eps_min: float = 1e-7,
                     lower: Optional[Tensor] = None, upper: Optional[Tensor] = None,
                     reuse: bool = True, crown_passes: int = 0, crown_extra_passes: int = 0,
                     crown_extra_margin: float = 0.25, bracket: bool = False,
                     info: Optional[Dict[str, Tensor]] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """[B] certified radii (pixel units) of ``model`` at ``x`` with labels ``y``.

    ``bracket``: return ``(radius, failed)`` instead, ``failed`` being the smallest eps at which
    the search evaluated this method's bound and it did not certify (inf where none did), so
    ``failed / radius`` is the search's resolution per example. An attack's ``upper`` is not a
    failure of the bound and is not reported; with ``crown_passes`` only failed *full* passes
    count (fresh evaluations; the probes below them are looser). Probes of the plain search
    intersect boxes from a larger eps: a fresh IBP evaluation fails wherever such a probe did
    (IBP is monotone in its boxes); CROWN-IBP's and CROWN's adaptive relaxations are not, so for
    them ``failed`` is where the search's evaluation failed, not a proof about a fresh one.

    ``model``: a module (traced here) or a :class:`BoundedModel` (reuse it across batches).
    ``target``: [B] class per example for the CNN-Cert random-target radius; None: untargeted.
    ``rel_tol``/``eps_min``/``lower``/``upper``/``reuse``/``crown_passes``: see the module
    docstring (``crown_passes`` > 0, method "crown": at most that many full-CROWN passes per
    example, ``steps`` one-backward probes after each, resolution ``rel_tol`` or 1e-3 if 0;
    ``crown_extra_passes`` more for the unbracketed examples whose last certified pass kept more
    than ``crown_extra_margin`` of the clean margin). ``info``: a dict that receives, on that
    path, ``margin_left`` [B] (last certified full pass's margin / clean margin; 1: none).
    """
    if steps < 1 or eps_init <= 0:
        raise ValueError(f"certified_radius: need steps >= 1 and eps_init > 0 (got {steps}, {eps_init})")
    if crown_extra_passes < 0 or not 0.0 <= crown_extra_margin <= 1.0:
        raise ValueError(f"certified_radius: need crown_extra_passes >= 0 and 0 <= crown_extra_margin <= 1 "
                         f"(got {crown_extra_passes}, {crown_extra_margin})")
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
        lo, fail, left = _crown_radius_passes(bm, x, y, norm, target, lo, hi, crown_passes, steps,
                                              tol or math.log1p(1e-3), math.log(eps_init), log_cap, log_min,
                                              x_min, x_max, crown_extra_passes, crown_extra_margin)
        if info is not None:
            info["margin_left"] = left.to(x.dtype)
        return _result(lo, fail, x.dtype, bracket)
    fail = torch.full((B,), math.inf, dtype=dt, device=dev)  # smallest log-eps this bound failed at
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
        le = eps.to(dt).log()
        lo[act] = torch.where(ok, torch.maximum(l, le), l)
        new_hi = ~ok & (log_eps < h)
        hi[act] = torch.where(new_hi, log_eps, h)
        fail[act] = torch.where(~ok, torch.minimum(fail[act], le), fail[act])
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
    return _result(lo, fail, x.dtype, bracket)


def _result(lo: Tensor, fail: Tensor, dtype: torch.dtype, bracket: bool) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    radius = torch.where(torch.isfinite(lo), lo.exp(), torch.zeros_like(lo)).to(dtype)
    return (radius, fail.exp().to(dtype)) if bracket else radius
