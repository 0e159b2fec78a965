"""The robustness-metric interface shared by DSRNA-Jacobian and DSRNA-CB, and its registry.

A metric maps ``(model, x, y)`` to a differentiable scalar R (larger = more robust) that the
search strategies plug into the architecture objective ``val_loss - gamma * R`` (paper eq. 16).
Metrics never call ``backward`` themselves: the caller does one ordinary backward of the whole
objective, which is what makes them work on a DDP-wrapped model (DDP's reducer fires once per
parameter per backward; ``backward(create_graph=True)`` is refused by DDP).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError, RobustnessConfig, replace
from ..registry import Registry

MetricFactory = Callable[[RobustnessConfig], Optional["RobustnessMetric"]]
METRICS: Registry[MetricFactory] = Registry("robustness metric")


class RobustnessMetric(ABC):
    """R(w, alpha, x): call it like ``R, logs = metric(model, x, y)``.

    ``model`` may be DDP-wrapped (it is called as a module); ``x`` is a batch in [0, 1] pixel
    space, ``y`` its labels. ``logs`` holds plain floats for TensorBoard. ``update=False`` tells
    an adaptive metric not to adapt on this call (e.g. the extra evaluations of a 2nd-order
    DARTS step); ``logits`` may hand over the caller's forward of the *same* ``x`` so a metric
    that can reuse it (the Jacobian one) saves a forward pass; ``extra`` is the caller's
    forward of :meth:`extra_inputs` when the metric asked for any.
    """

    name: str = ""

    def __init__(self, cfg: RobustnessConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 logits: Optional[torch.Tensor] = None,
                 extra: Optional[torch.Tensor] = None,
                 update: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
        ...

    def forward_context(self, model: nn.Module) -> ContextManager[Any]:
        """A context the caller's forward of the *same* batch runs in, for metrics that take
        something from it (DSRNA-CB: the BatchNorm statistics). Default: nothing."""
        return contextlib.nullcontext()

    def extra_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Inputs the metric wants evaluated in the caller's forward, appended to ``x``.

        One forward of ``cat([x, extra_inputs])`` then serves both the loss (first rows) and
        the metric (``extra=`` the remaining rows' output): on small or launch-bound models
        one forward of 2B rows costs far less than two of B. None: the metric needs none.
        """
        return None

    def state_dict(self) -> Dict[str, Any]:
        """Adaptive state to checkpoint (empty for stateless metrics)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} metric has no state; got keys {sorted(state)}")


def first_logits(out: Any) -> torch.Tensor:
    """Logits from a forward output; derived nets in train mode return ``(logits, aux)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def batch_subset(x: torch.Tensor, y: torch.Tensor, fraction: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``ceil(fraction * B)`` examples (batches are shuffled, so the first are a sample)."""
    m = max(1, math.ceil(fraction * x.shape[0]))
    return x[:m], y[:m]


def metric_forward(model: nn.Module, metric: Optional[RobustnessMetric], x: torch.Tensor,
                   y: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The objective's forward of ``x`` done so the metric can use it: (logits, extra).

    Runs in the metric's :meth:`~RobustnessMetric.forward_context` and, when the metric asks
    for :meth:`~RobustnessMetric.extra_inputs`, as ONE forward of ``cat([x, extra_inputs])``;
    ``extra`` is then the output of those rows (else None). Pass both to the metric's call.
    """
    if metric is None:
        return model(x), None
    extra_in = metric.extra_inputs(x, y)
    with metric.forward_context(model):
        out = model(x if extra_in is None else torch.cat([x, extra_in]))
    if extra_in is None:
        return out, None
    return out[: x.shape[0]], out[x.shape[0]:]


def metric_config(name: str = "none", base: Optional[RobustnessConfig] = None, **keys: Any) -> RobustnessConfig:
    """The ``robustness`` config of metric ``name`` from flat keyword arguments (tests, benches):
    shared keys (gamma, norm, batch_fraction, ...) stay at the top, every other key goes to the
    metric's own section ``robustness.<name>``; an unknown key is a ConfigError naming it."""
    shared = {f.name for f in dataclasses.fields(RobustnessConfig)}
    dotted = {k if k in shared else f"{name}.{k}": v for k, v in keys.items()}
    return replace(base if base is not None else RobustnessConfig(), name=name, **dotted)


def build_metric(cfg: RobustnessConfig) -> Optional[RobustnessMetric]:
    """The metric named ``cfg.name`` (``none`` -> None); unknown names list the valid ones."""
    return METRICS.get(cfg.name, key="robustness.name")(cfg)

