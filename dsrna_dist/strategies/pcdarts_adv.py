"""PC-DARTS-ADV: the partial-channel supernet (PC-DARTS) with the SDARTS-ADV weight step.

The public SDARTS code has no such path; this combines them: PGD perturbs the op weights
softmax(alpha) only, the edge weights (betas) are used unperturbed."""
from __future__ import annotations

from ..config import SearchConfig
from .base import STRATEGIES
from .pcdarts import require_partial_channels
from .sdarts_adv import SDARTSADV


@STRATEGIES.register("pcdarts_adv")
class PCDARTSADV(SDARTSADV):
    name = "pcdarts_adv"

    @classmethod
    def check_config(cls, cfg: SearchConfig) -> None:
        super().check_config(cfg)
        require_partial_channels(cfg, cls.name)
