"""Moved to :mod:`dsrna_dist.bounds.evaluation` (certification is not an attack); this
re-export keeps old imports working."""
from ..bounds.evaluation import METHOD_ORDER, certify_batch, min_adversarial_eps, random_targets

__all__ = ["METHOD_ORDER", "certify_batch", "min_adversarial_eps", "random_targets"]
