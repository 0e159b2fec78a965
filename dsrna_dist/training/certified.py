"""Certified training: ``ibp`` (Gowal et al. 2018) and ``crown_ibp`` (Zhang et al. 2020).

Loss: kappa * CE(f(x), y) + (1 - kappa) * CE(z, y), where z_y = 0 and z_j = -lb_j, lb_j the
certified lower bound of f_y - f_j over the eps ball (the worst-case logits), from the
project's one bound engine (:mod:`dsrna_dist.bounds`). ``crown_ibp`` mixes the bounds,
beta * CROWN-IBP + (1 - beta) * IBP, with beta ramping 1 -> 0 as eps ramps (Zhang et al.).
kappa ramps 1 -> ``regime.kappa_end`` with eps.

Practices from Shi et al. 2021 that are implemented: IBP-aware initialisation
(``regime.ibp_init``: conv/linear weights ~ N(0, 2 pi / fan_in^2), so interval widths neither
explode nor vanish through depth at the start); BatchNorm on the clean batch's statistics (the
bound pass reuses the statistics of the training forward, captured by hooks: no second clean
pass, running statistics moved once per step as in natural training); an eps warm-up
(``ramp_start`` epochs of eps = 0) then a linear ramp (``warmup_epochs``); their bound-balance
regulariser during the ramp (``regime.bound_reg*``, :mod:`.bound_balance`), on the ReLU
pre-activation boxes of the same bound pass (IBP's; CROWN-IBP's intermediate boxes are IBP's
too). Not implemented: their exponential first phase of the ramp.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from . import bound_balance as bb
from .base import REGIMES, Regime, RegimeOutput, eps_at, split_output


def ramp_fraction(eps: float, eps_max: float) -> float:
    return 0.0 if eps_max <= 0 else min(1.0, eps / eps_max)


class _Certified(Regime):
    method = "ibp"

    def validate(self) -> None:
        c = self.cfg
        if not c.eps > 0:
            raise ConfigError(f"key 'regime.eps': regime {c.name!r} needs a positive radius, got {c.eps}")
        if self.tcfg.model.auxiliary:
            raise ConfigError(f"key 'model.auxiliary': regime {c.name!r} bounds the main classifier only; "
                              "set model.auxiliary=false")
        if self.tcfg.model.drop_path > 0:
            raise ConfigError(f"key 'model.drop_path': regime {c.name!r} bounds the network without drop-path; "
                              "set model.drop_path=0")
        bad = [t for t in c.bound_reg_terms if t not in bb.TERMS]
        if bad or not c.bound_reg_terms:
            raise ConfigError(f"key 'regime.bound_reg_terms': expected a non-empty list of {list(bb.TERMS)}, "
                              f"got {list(c.bound_reg_terms)}")
        self._bm = None

    def describe(self) -> str:
        c = self.cfg
        return (f"{self.name} eps={c.eps:g} (l_{c.norm}; eps 0 for {c.ramp_start:g} epochs, then a "
                f"{c.warmup_epochs:g}-epoch ramp), kappa 1 -> {c.kappa_end:g}, IBP init {c.ibp_init}"
                + (f", bound-balance regulariser lambda={c.bound_reg:g} ({'+'.join(c.bound_reg_terms)}, "
                   f"tol {c.bound_reg_tol:g}{', decayed' if c.bound_reg_decay else ''})" if c.bound_reg > 0 else ""))

    def init_weights(self, net: nn.Module) -> None:
        if not self.cfg.ibp_init:
            return
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)

    def bounded(self, net: nn.Module):
        if self._bm is None or self._bm.model is not net:
            from ..bounds import BoundedModel

            self._bm = BoundedModel(net)
        return self._bm

    def beta(self, frac: float) -> float:
        return 0.0  # pure IBP

    def loss(self, model, net, x, y, *, drop_prob, epoch, step, steps_per_epoch, crit) -> RegimeOutput:
        from ..bounds import capture_bn_stats
        from ..bounds.graph import margin_spec

        eps = eps_at(self.cfg, epoch, step, steps_per_epoch)
        frac = ramp_fraction(eps, self.cfg.eps)
        kappa = 1.0 - frac * (1.0 - self.cfg.kappa_end)
        bm = self.bounded(net)
        with capture_bn_stats(net, bm.bn_modules) as stats:
            logits, _ = split_output(model(x, drop_prob=0.0))
        clean = crit(logits, y)
        if eps <= 0:
            return RegimeOutput(clean, clean, logits, y, {"regime_eps": 0.0, "kappa": 1.0})
        C = margin_spec(y, logits.shape[1]).to(logits.dtype)
        beta = self.beta(frac)
        reg_coef = bb.coefficient(self.cfg.bound_reg, eps, self.cfg.eps, self.cfg.bound_reg_decay)
        kept: dict = {}
        keep = kept if reg_coef > 0 else None  # both methods share the IBP intermediate boxes: keep one
        lb = None
        if beta < 1:
            lb, _ = bm.bounds(x, eps, self.cfg.norm, "ibp", C, need_upper=False, bn_stats=stats, keep=keep)
            keep = None
        if beta > 0:
            lb2, _ = bm.bounds(x, eps, self.cfg.norm, "crown-ibp", C, need_upper=False, bn_stats=stats, keep=keep)
            lb = lb2 if lb is None else beta * lb2 + (1 - beta) * lb
        k = logits.shape[1]
        worst = lb.new_zeros((x.shape[0], k))
        others = torch.arange(k, device=y.device).expand(y.shape[0], k)
        others = others[others != y[:, None]].view(y.shape[0], k - 1)
        worst = worst.scatter(1, others, -lb)  # z_y = 0, z_j = -lb(f_y - f_j): the worst-case logits
        robust = F.cross_entropy(worst, y)
        loss = kappa * clean + (1 - kappa) * robust
        verified = (lb > 0).all(1).float().mean()
        logs = {"regime_eps": eps, "kappa": kappa, "bound_beta": beta, "robust_loss": float(robust.detach()),
                "train_verified": float(verified)}
        if self.cfg.bound_reg > 0:
            logs["bound_reg_coef"] = reg_coef
        if reg_coef > 0:
            terms = bb.balance_terms(bb.relu_input_boxes(bm, kept), bb.input_scale(net, x, eps),
                                     self.cfg.bound_reg_tol)
            loss = loss + reg_coef * bb.regulariser(terms, self.cfg.bound_reg_terms)
            logs.update({"bound_reg_tightness": float(terms.tightness.detach()),
                         "bound_reg_relu": float(terms.relu.detach())})
        return RegimeOutput(loss, clean, logits, y, logs)


@REGIMES.register("ibp")
class IBP(_Certified):
    name = "ibp"


@REGIMES.register("crown_ibp")
class CrownIBP(_Certified):
    name = "crown_ibp"

    def beta(self, frac: float) -> float:
        return 1.0 - frac  # CROWN-IBP bounds early in the ramp, pure IBP at full eps (Zhang et al.)
