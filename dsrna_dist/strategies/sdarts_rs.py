"""SDARTS-RS: the weight step runs at randomly smoothed arch weights (uniform noise on
softmax(alpha), radius ramped perturb_eps -> perturb_eps_max); the arch step is DARTS'."""
from __future__ import annotations

from typing import Optional

from ..space.supernet import ArchWeights
from .base import STRATEGIES
from .darts import DARTS
from .perturb import detached, ramp_eps, step_generator, uniform_noise


@STRATEGIES.register("sdarts_rs")
class SDARTSRS(DARTS):
    name = "sdarts_rs"

    def eps(self, epoch: int) -> float:
        s = self.cfg.sdarts
        return ramp_eps(s.perturb_eps, s.perturb_eps_max, epoch, self.cfg.epochs)

    def perturbation(self, x, y, epoch: int, step: int) -> Optional[ArchWeights]:
        base = detached(self.model.arch_weights())
        gen = step_generator(self.ctx.seed, step, base["normal"].device)
        return uniform_noise(base, self.eps(epoch), gen)
