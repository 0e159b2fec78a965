"""PC-DARTS (Xu et al. 2020): DARTS on the partial-channel supernet with edge normalization.

The search space does the work (``model.partial_channels`` K > 1, ``model.edge_normalization``);
the strategy only insists on them, and arch updates start at ``strategy.arch_start_epoch``
(15 in the paper's configs)."""
from __future__ import annotations

from ..config import ConfigError, SearchConfig
from .base import STRATEGIES
from .darts import DARTS


def require_partial_channels(cfg: SearchConfig, name: str) -> None:
    if cfg.model.partial_channels < 2:
        raise ConfigError(f"key 'model.partial_channels': strategy {name} needs K >= 2 "
                          f"(PC-DARTS uses 4), got {cfg.model.partial_channels}")
    if not cfg.model.edge_normalization:
        raise ConfigError(f"key 'model.edge_normalization': strategy {name} needs it true")


@STRATEGIES.register("pcdarts")
class PCDARTS(DARTS):
    name = "pcdarts"

    @classmethod
    def check_config(cls, cfg: SearchConfig) -> None:
        super().check_config(cfg)
        require_partial_channels(cfg, cls.name)
