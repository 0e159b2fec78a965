"""SDARTS-ADV: the weight step runs at adversarially perturbed arch weights (l_inf PGD on
softmax(alpha), ``adv_steps`` steps of 2*eps/steps, random start; eps ramped); the arch step
is DARTS'. PGD uses the unwrapped model and only differentiates w.r.t. the arch weights; it
runs in eval mode as the reference (``sdarts.adv_bn``): running BN stats are not updated."""
from __future__ import annotations

from typing import Optional

from ..space.supernet import ArchWeights
from .base import STRATEGIES
from .perturb import attack_mode, detached, linf_pgd, step_generator
from .sdarts_rs import SDARTSRS


@STRATEGIES.register("sdarts_adv")
class SDARTSADV(SDARTSRS):
    name = "sdarts_adv"

    def perturbation(self, x, y, epoch: int, step: int) -> Optional[ArchWeights]:
        base = detached(self.model.arch_weights())
        gen = step_generator(self.ctx.seed, step, base["normal"].device)
        with attack_mode(self.model, self.cfg.sdarts.adv_bn):
            return linf_pgd(lambda w: self.loss(self.model(x, w), y), base, self.eps(epoch),
                            self.cfg.sdarts.adv_steps, gen)
