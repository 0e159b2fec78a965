"""Differentiable robustness metrics R(w, alpha, x) for the DSRNA architecture objective.

``build_metric(cfg)`` returns the metric named ``cfg.name`` (``none``: None); the search
strategies minimise ``val_loss - cfg.gamma * R``. One file per metric, registered in METRICS.
"""
from .base import (METRICS, RobustnessMetric, batch_subset, build_metric, first_logits, metric_config,
                   metric_forward)
from . import none, jacobian, certified  # noqa: F401  (registration)
from .certified import CertifiedMetric
from .jacobian import JacobianMetric

__all__ = ["METRICS", "RobustnessMetric", "build_metric", "first_logits", "metric_config",
           "batch_subset", "metric_forward", "JacobianMetric", "CertifiedMetric"]
