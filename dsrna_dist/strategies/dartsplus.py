"""DARTS+ early stopping (Liang et al. 2019) as a rule any strategy can use (``stopping:``).

DARTS collapses to parameter-free ops when searched too long; DARTS+ ends the search at the
first epoch where either

* criterion 1: the derived normal cell holds >= ``stopping.max_skip`` (2) skip-connects, or
* criterion 2: the ranking of the architecture weights of the learnable ops (those with
  weights: sep/dil convs; ``rank_ops: all`` ranks every non-none op) is the same on every edge
  of both cells for ``stopping.patience`` consecutive epochs (the paper's "stable for 10 epochs").

The rule is fed once per epoch (``SearchStrategy.on_epoch_end``) with the genotype the loop
derived; its state is a few integers and the last ranking, checkpointed with the strategy, so a
resumed run stops where the uninterrupted one would. The reason is a sentence the loop logs
and writes to ``summary.json`` (``stopped``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..config import SearchConfig, StoppingConfig


@lru_cache(maxsize=None)
def is_learnable(op: str) -> bool:
    """Whether the op has weights (built once, tiny, on CPU; stride 1)."""
    if op == "none":
        return False
    from ..space.ops import build_op

    return any(True for _ in build_op(op, 4, 1, affine=False).parameters())


def edge_rankings(weights: Mapping[str, torch.Tensor], primitives: Sequence[str],
                  rank_ops: str = "learnable") -> List[List[int]]:
    """Per edge (normal edges, then reduce edges): op indices by decreasing weight (ties: lower
    index first), restricted to the ranked ops."""
    cols = [k for k, p in enumerate(primitives)
            if p != "none" and (rank_ops == "all" or is_learnable(p))]
    out: List[List[int]] = []
    for kind in ("normal", "reduce"):
        for row in weights[kind].tolist():
            out.append(sorted(cols, key=lambda k: (-row[k], k)))
    return out


class DartsPlusStopping:
    """Criterion 1 (skip count) or criterion 2 (stable ranking), whichever comes first."""

    def __init__(self, cfg: StoppingConfig) -> None:
        self.cfg = cfg
        self.prev: Optional[List[List[int]]] = None
        self.stable = 0  # consecutive epochs whose ranking equals the previous epoch's
        self.reason: Optional[str] = None

    def update(self, epoch: int, model: Any, genotype: Any) -> None:
        self.observe(epoch, model.genotype_weights(), model.primitives, genotype)

    def observe(self, epoch: int, weights: Mapping[str, torch.Tensor], primitives: Sequence[str],
                genotype: Any) -> Optional[str]:
        """Feed epoch ``epoch``'s weights and derived genotype; returns the stop reason, if any."""
        if self.reason is not None:
            return self.reason
        rank = edge_rankings(weights, primitives, self.cfg.rank_ops)
        self.stable = self.stable + 1 if rank == self.prev else 0
        self.prev = rank
        if epoch + 1 < self.cfg.min_epochs:
            return None
        skips = sum(op == "skip_connect" for op, _ in genotype.normal) if genotype is not None else 0
        if skips >= self.cfg.max_skip:
            self.reason = (f"DARTS+ criterion 1 at epoch {epoch}: the normal cell has {skips} "
                           f"skip_connect (stopping.max_skip={self.cfg.max_skip})")
        elif self.stable >= self.cfg.patience:
            self.reason = (f"DARTS+ criterion 2 at epoch {epoch}: the ranking of alpha "
                           f"({self.cfg.rank_ops} ops) unchanged for {self.stable} epochs "
                           f"(stopping.patience={self.cfg.patience})")
        return self.reason

    def state_dict(self) -> Dict[str, Any]:
        return {"prev": self.prev, "stable": self.stable, "reason": self.reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev = state.get("prev")
        self.stable = int(state.get("stable", 0))
        self.reason = state.get("reason")


def build_stopping_rule(cfg: SearchConfig) -> Optional[DartsPlusStopping]:
    if cfg.stopping.name == "none":
        return None
    return DartsPlusStopping(cfg.stopping)
