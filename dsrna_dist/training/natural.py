"""``natural``: cross-entropy on clean inputs (the DARTS retraining objective)."""
from __future__ import annotations

from .base import REGIMES, Regime, RegimeOutput


@REGIMES.register("natural")
class Natural(Regime):
    name = "natural"

    def loss(self, model, net, x, y, *, drop_prob, epoch, step, steps_per_epoch, crit) -> RegimeOutput:
        loss, main, logits = self.supervised(model, x, y, drop_prob, crit)
        return RegimeOutput(loss, main, logits, y)
