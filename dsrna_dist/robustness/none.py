"""``robustness.name: none``: plain (PC-)DARTS, no robustness term (build_metric returns None)."""
from __future__ import annotations

from typing import Optional

from ..config import RobustnessConfig
from .base import METRICS, RobustnessMetric


@METRICS.register("none")
def no_metric(cfg: RobustnessConfig) -> Optional[RobustnessMetric]:
    return None
