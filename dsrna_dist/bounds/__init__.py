"""Bound propagation (IBP, CROWN-IBP, CROWN) over fx-traced models, one bound class per op.

Public API:

* :class:`BoundedModel` - ``.bounds(x, eps, norm, method, C)`` and ``.margin_lower_bound(...)``;
* :func:`bounds`, :func:`margin_lower_bound` - one-shot wrappers taking a model;
* :func:`certified_radius` - CNN-Cert style bisection of the certified radius, batched;
* :func:`capture_bn_stats` - the BN batch statistics of a forward, for value-free bounds;
* :data:`BOUND_OPS` - the op-bound registry (``module:<type>``, ``function:<name>``,
  ``method:<name>`` keys); a new op in the search space needs one bound class registered here.

Conventions: inputs are [0, 1] pixels (normalization is inside the model), eps is in pixel
units, the input set is the l_inf or l_2 ball clipped to ``[x_min, x_max]``; BN uses the
statistics the model is in (train mode: the clean batch's statistics, or those captured from
the caller's own forward with :func:`capture_bn_stats`; eval: running stats). When every BN's
statistics are known up front the engine propagates *value-free* (no clean pass).
``margin_lower_bound`` returns [B, K] lower bounds of f_y - f_j with column y equal to 0.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn

from .base import (BOUND_OPS, BoundError, BoundOp, Interval, has_module_bound, register_functions,
                   register_methods, register_modules)
from .bnstats import capture_bn_stats
from .certify import certified_radius
from .graph import METHODS, NORMS, BoundedModel, margin_spec

__all__ = ["BoundedModel", "capture_bn_stats", "bounds", "margin_lower_bound", "certified_radius", "BOUND_OPS",
           "BoundOp", "BoundError", "Interval", "METHODS", "NORMS", "margin_spec",
           "has_module_bound", "register_modules", "register_functions", "register_methods"]


def _bm(model: Union[nn.Module, BoundedModel]) -> BoundedModel:
    return model if isinstance(model, BoundedModel) else BoundedModel(model)


def bounds(model: Union[nn.Module, BoundedModel], x: Tensor, eps, norm: str = "inf",
           method: str = "crown-ibp", C: Optional[Tensor] = None, x_min: float = 0.0,
           x_max: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(lb, ub) of ``C @ model(x')`` over the input set (C None: the logits themselves)."""
    return _bm(model).bounds(x, eps, norm, method, C, x_min, x_max)


def margin_lower_bound(model: Union[nn.Module, BoundedModel], x: Tensor, y: Tensor, eps,
                       norm: str = "inf", method: str = "crown-ibp", x_min: float = 0.0,
                       x_max: float = 1.0, target: Optional[Tensor] = None) -> Tensor:
    """[B, K] lower bounds of f_y - f_j (column y = 0), or [B] against ``target``."""
    return _bm(model).margin_lower_bound(x, y, eps, norm, method, x_min, x_max, target)
