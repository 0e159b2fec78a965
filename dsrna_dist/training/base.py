"""The regime interface: one batch in, one loss out (plus what the epoch statistics need)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError, RegimeConfig, TrainConfig
from ..registry import Registry

REGIMES: "Registry[type]" = Registry("training regime")


@dataclass
class RegimeOutput:
    """``loss`` is what backward sees (aux head included); ``loss_main`` and ``logits`` feed the
    epoch statistics (train loss / top-1 are measured on the inputs the regime trains on)."""
    loss: torch.Tensor
    loss_main: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    logs: Dict[str, float] = field(default_factory=dict)


def eps_at(cfg: RegimeConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Training radius at (epoch, step): linear from ~0 to ``eps`` over ``warmup_epochs``, per step.

    Why a ramp: a network attacked at full radius from its first step often never leaves the
    constant classifier (Gowal et al. 2018; Shi et al. 2021 for certified training)."""
    done = epoch + (step + 1) / max(1, steps_per_epoch) - cfg.ramp_start
    if done <= 0:
        return 0.0
    if cfg.warmup_epochs <= 0:
        return float(cfg.eps)
    return float(cfg.eps) * min(1.0, done / cfg.warmup_epochs)


def split_output(out: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return out if isinstance(out, tuple) else (out, None)


def logits_of(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` as a logits-only function (a network in train mode also returns its aux logits)."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return split_output(net(x))[0]
    return f


class Regime:
    """Base class. ``model`` is the engine-wrapped network (DDP/DeepSpeed: gradients are reduced
    through it), ``net`` the plain module (attacks use it: no collectives, no gradient hooks)."""

    name = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.tcfg = cfg
        self.cfg = cfg.regime
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the key for settings this regime cannot use."""

    def init_weights(self, net: nn.Module) -> None:
        """Called once on a fresh run (not on resume), on every rank with the same RNG state."""

    def describe(self) -> str:
        return self.name

    def supervised(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, drop_prob: float,
                   crit: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss incl. aux, main loss, logits) of a plain forward: the DARTS objective."""
        logits, aux = split_output(model(x, drop_prob=drop_prob))
        main = crit(logits, y)
        loss = main if aux is None else main + self.tcfg.model.auxiliary_weight * crit(aux, y)
        return loss, main, logits

    def loss(self, model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, drop_prob: float,
             epoch: int, step: int, steps_per_epoch: int, crit: nn.Module) -> RegimeOutput:
        raise NotImplementedError


def build_regime(cfg: TrainConfig) -> Regime:
    """The regime named by ``regime.name``; unknown names list the valid ones."""
    from ..registry import RegistryError

    try:
        cls = REGIMES.get(cfg.regime.name, key="regime.name")
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    return cls(cfg)
