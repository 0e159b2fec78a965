"""Training regimes for the train stage: how one batch becomes a loss.

A regime is one file that registers a :class:`~.base.Regime` subclass in ``REGIMES`` and reads
its settings from the ``regime:`` section of the train config. ``natural`` is plain
cross-entropy; ``pgd_at`` (Madry et al. 2018) and ``trades`` (Zhang et al. 2019) train on PGD
examples made by the project's one PGD (:meth:`dsrna_dist.attacks.pgd.PGD.ascend`).
Also here: the held-out validation split that selects ``best.pt`` (:mod:`.split`) and the
non-finite guard (:mod:`.guard`).
"""
from __future__ import annotations

from .base import REGIMES, Regime, RegimeOutput, build_regime, eps_at
from .guard import NonFiniteError, all_finite, any_rank_nonfinite
from .split import SplitRecord, holdout_split

from . import natural, adversarial, certified  # noqa: E402,F401  (registers the regimes)

__all__ = ["REGIMES", "Regime", "RegimeOutput", "build_regime", "eps_at", "NonFiniteError", "all_finite",
           "any_rank_nonfinite", "SplitRecord", "holdout_split"]
