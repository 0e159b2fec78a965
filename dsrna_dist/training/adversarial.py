"""Adversarial training: ``pgd_at`` (Madry et al. 2018) and ``trades`` (Zhang et al. 2019).

The examples come from the project's one PGD (:meth:`PGD.ascend`), run on the plain module
(no DDP collectives, no parameter gradients). By default the attack sees the network in
**eval mode** (BatchNorm running statistics, no drop-path), as the TRADES reference code does;
``regime.attack_bn: train`` uses batch statistics instead and restores the running statistics
afterwards, so the attack's forwards never move them. The eps ramp (``regime.warmup_epochs``)
is a pure function of (epoch, step), and the random starts come from the per-rank torch stream
that checkpoints capture: a resumed run continues bit-exactly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import PGD
from ..config import AttackConfig, ConfigError
from .base import REGIMES, Regime, RegimeOutput, eps_at, logits_of, split_output


class _Adversarial(Regime):
    def validate(self) -> None:
        c = self.cfg
        if not c.eps > 0:
            raise ConfigError(f"key 'regime.eps': regime {c.name!r} needs a positive radius, got {c.eps}")
        if c.norm == "inf" and c.eps >= 1:
            raise ConfigError(f"key 'regime.eps': {c.eps} covers the whole [0, 1] pixel range in l_inf")
        step = c.step_size if c.step_size > 0 else 2.5 * c.eps / c.steps
        self.pgd = PGD(AttackConfig(name="pgd", eps=c.eps, norm=c.norm, steps=c.steps, step_size=step,
                                    restarts=1, random_start=c.random_start, loss="ce"),
                       seed=self.tcfg.run.seed)

    def describe(self) -> str:
        c = self.cfg
        return (f"{self.name} eps={c.eps:g} (l_{c.norm}, warm-up {c.warmup_epochs:g} epochs) "
                f"PGD-{c.steps} step {self.pgd.cfg.step_size:.4g} at full eps, attack BN: {c.attack_bn}"
                + (f", beta={c.beta:g}" if self.name == "trades" else ""))

    @contextlib.contextmanager
    def attack_mode(self, net: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The network as the attack sees it (see the module docstring), restored on exit."""
        was = net.training
        if self.cfg.attack_bn == "eval":
            net.eval()
            try:
                yield logits_of(net)
            finally:
                net.train(was)
            return
        saved = [b.detach().clone() for b in net.buffers()]
        net.train()
        try:
            yield logits_of(net)
        finally:
            with torch.no_grad():
                for b, s in zip(net.buffers(), saved):
                    b.copy_(s)
            net.train(was)

    def attack(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               objective: Optional[Callable[[torch.Tensor], Callable]] = None) -> torch.Tensor:
        """``objective(f)`` builds the summed attack objective from the attack-mode logits
        function ``f`` (TRADES needs the clean prediction under the same mode)."""
        with self.attack_mode(net) as f:
            obj = objective(f, x) if objective is not None else None
            return self.pgd.ascend(f, x, y, objective=obj, eps=eps)


@REGIMES.register("pgd_at")
class PGDAT(_Adversarial):
    """Madry et al.: minimise the cross-entropy at the PGD point (train statistics are on it)."""
    name = "pgd_at"

    def loss(self, model, net, x, y, *, drop_prob, epoch, step, steps_per_epoch, crit) -> RegimeOutput:
        eps = eps_at(self.cfg, epoch, step, steps_per_epoch)
        x_adv = self.attack(net, x, y, eps)
        loss, main, logits = self.supervised(model, x_adv, y, drop_prob, crit)
        return RegimeOutput(loss, main, logits, y, {"regime_eps": eps})


@REGIMES.register("trades")
class TRADES(_Adversarial):
    """Zhang et al.: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising that KL.

    Deviations, stated: the inner maximisation starts from PGD's uniform random start (the
    reference uses 0.001 * N(0, 1)); clean and adversarial halves go through the network as one
    concatenated batch (one DDP forward per step), so BatchNorm's batch statistics cover both.
    The aux head (when on) sees the clean half only."""
    name = "trades"

    def loss(self, model, net, x, y, *, drop_prob, epoch, step, steps_per_epoch, crit) -> RegimeOutput:
        eps = eps_at(self.cfg, epoch, step, steps_per_epoch)

        def kl_objective(f, x0):
            with torch.no_grad():
                p_clean = F.softmax(f(x0), dim=1)
            return lambda logits, _y: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

        x_adv = self.attack(net, x, y, eps, kl_objective)
        b = x.shape[0]
        logits_all, aux = split_output(model(torch.cat([x, x_adv]), drop_prob=drop_prob))
        nat, adv = logits_all[:b], logits_all[b:]
        main = crit(nat, y)
        robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction="batchmean")
        loss = main + self.cfg.beta * robust
        if aux is not None:
            loss = loss + self.tcfg.model.auxiliary_weight * crit(aux[:b], y)
        return RegimeOutput(loss, main, nat, y, {"regime_eps": eps, "trades_kl": float(robust.detach())})
