"""AutoAttack (Croce & Hein 2020), standard version, through the authors' PyPI package.

``pip install pyautoattack==0.2.0`` (extra ``attacks``). Imported lazily so the rest of the
toolkit works without it. Its randomness is seeded per call, not per example: results can
depend on how examples are batched/sharded (unlike our PGD).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from .base import ATTACKS, Attack, check_finite_eps


@ATTACKS.register("autoattack")
class AutoAttackStandard(Attack):
    #: seeded per call (the package's own RNG use), so records depend on batching and ranks
    per_example_seeded = False

    def validate(self) -> None:
        check_finite_eps(self.cfg, self.label)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        try:
            from pyautoattack import AutoAttack
        except ImportError:
            raise ImportError("attack 'autoattack' needs the authors' package: pip install "
                              "pyautoattack==0.2.0 (or pip install 'dsrna_dist[attacks]')") from None
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        aa = AutoAttack(model, norm="Linf" if self.norm == "inf" else "L2", eps=self.eps,
                        version="standard", seed=self.seed, device=x.device)
        # the standard version targets the 9 runner-up classes; fewer classes -> all of them
        k = int(model(x[:1]).shape[1])
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, k - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, k - 1)
        with torch.enable_grad():
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv
