"""The bound-balance regulariser of Shi et al. 2021 ("Fast Certified Robust Training with Short
Warmup", NeurIPS 2021, Sec. 4.2), for IBP / CROWN-IBP training during the eps ramp.

Why: early in IBP training the interval widths of deep layers can explode, and IBP drives most
ReLUs inactive (dead), after which the robust loss has little gradient left. Two terms, each
averaged over the ReLU pre-activation boxes [l, u] of the bound pass (one box per ReLU input
node of the traced graph; DARTS cells' duplicate ReLUs of one state are one node after the
engine merges them), with centre c = (u + l) / 2 and radius r = (u - l) / 2 taken over every
neuron of every example in the (per-rank) batch, and a tolerance ``tol`` (their alpha, 0.5):

* tightness: ``relu(tol - tau_0 / mean(r)) / tol``. tau_0 is the mean radius of the input box
  as the first layer sees it (after the network's Normalize, i.e. pixel radius / std, as their
  inputs are normalised before the model); IBP-aware initialisation keeps mean(r) ~ tau_0 at
  every depth, and the term penalises a layer whose widths grew more than 1/tol times.
* relu: active (l > 0) vs inactive (u < 0) neurons should balance, in the mean of their centres
  and in the spread of their centres around the layer mean:
  ``rho_m = sum_act c / -sum_inact c``, ``rho_v = sum_act (c - mean c)^2 / sum_inact (c - mean c)^2``,
  each folded to min(rho, 1/rho) in (0, 1]; term ``(relu(tol - rho_m) + relu(tol - rho_v)) / tol``.
  A layer with no active or no inactive neuron has no ratio: it contributes 0 (their code
  skips a non-finite layer term; here the case is decided before any division, so no NaN or
  infinity can reach the gradients).

The coefficient is ``lambda * (1 - eps / eps_max)`` (their default: it fades out as eps ramps),
or ``lambda`` with ``decay: false``; it applies only while 0 < eps < eps_max (their
``num_reg_epochs`` = the end of the ramp). Differences from their code: no term at eps = 0
(the natural phase has no bound pass), and tau_0 from the box of the network's Normalize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

TERMS = ("tightness", "relu")


@dataclass
class BalanceTerms:
    tightness: Tensor
    relu: Tensor
    layers: int


def input_scale(net: nn.Module, x: Tensor, eps: float, x_min: float = 0.0, x_max: float = 1.0) -> Tensor:
    """tau_0: mean radius of the input box ``[x - eps, x + eps] ∩ [x_min, x_max]`` in the units of
    the network's first layer (divided by the per-channel std of its Normalize, if it has one).
    The l_2 ball's box hull is the same box, so this serves both norms."""
    from ..space.layers import Normalize

    rad = ((x + eps).clamp(max=x_max) - (x - eps).clamp(min=x_min)) / 2
    norm = next((m for m in net.modules() if isinstance(m, Normalize)), None)
    if norm is not None and x.dim() == 4 and norm.std.numel() == x.shape[1]:
        rad = rad / norm.std.to(rad)[:, None, None]
    return rad.mean().detach()


def _fold(r: Tensor) -> Tensor:
    return torch.minimum(r, 1.0 / r)


def layer_terms(lower: Tensor, upper: Tensor, tau0: Tensor, tol: float) -> tuple:
    """(tightness, relu) terms of one pre-activation box (any shape; every element counts)."""
    c, r = (upper + lower) / 2, (upper - lower) / 2
    tight = torch.relu(tol - tau0 / r.mean().clamp(min=1e-12)) / tol
    act, inact = lower > 0, upper < 0
    if not bool(act.any()) or not bool(inact.any()):
        return tight, c.new_zeros(())
    zero = c.new_zeros(())
    m_act = torch.where(act, c, zero).sum()
    m_inact = -torch.where(inact, c, zero).sum()  # > 0: every inactive centre is negative
    d2 = (c - c.mean()) ** 2
    v_act = torch.where(act, d2, zero).sum().clamp(min=1e-30)
    v_inact = torch.where(inact, d2, zero).sum().clamp(min=1e-30)
    rho_m, rho_v = _fold(m_act / m_inact), _fold(v_act / v_inact)
    return tight, (torch.relu(tol - rho_m) + torch.relu(tol - rho_v)) / tol


def balance_terms(boxes: Iterable[tuple], tau0: Tensor, tol: float) -> BalanceTerms:
    """Both terms averaged over the given (lower, upper) pre-activation boxes."""
    tights: List[Tensor] = []
    relus: List[Tensor] = []
    for lo, up in boxes:
        t, r = layer_terms(lo, up, tau0, tol)
        tights.append(t)
        relus.append(r)
    if not tights:
        z = tau0.new_zeros(())
        return BalanceTerms(z, z, 0)
    return BalanceTerms(torch.stack(tights).mean(), torch.stack(relus).mean(), len(tights))


def relu_input_boxes(bm, kept: Dict) -> List[tuple]:
    """(lower, upper) of every ReLU input node of the bounded model ``bm``, in graph order,
    from the boxes a bound pass handed back through ``keep``."""
    from ..bounds.ops_nonlinear import BoundReLU

    nodes = []
    for n, op in bm.ops.items():
        if isinstance(op, BoundReLU) and n.args and n.args[0] in kept and n.args[0] not in nodes:
            nodes.append(n.args[0])
    nodes.sort(key=bm.index.get)
    return [(kept[a].lower, kept[a].upper) for a in nodes]


def coefficient(lam: float, eps: float, eps_max: float, decay: bool) -> float:
    """lambda (1 - eps / eps_max) during the ramp (0 < eps < eps_max), else 0."""
    if lam <= 0 or eps <= 0 or eps >= eps_max:
        return 0.0
    return lam * (1.0 - eps / eps_max) if decay else lam


def regulariser(terms: BalanceTerms, which: Optional[Iterable[str]] = None) -> Tensor:
    which = TERMS if which is None else tuple(which)
    out = terms.tightness.new_zeros(())
    if "tightness" in which:
        out = out + terms.tightness
    if "relu" in which:
        out = out + terms.relu
    return out
