"""P-DARTS (Chen et al. 2019): progressive depth with search-space approximation.

The search runs in stages (``pdarts.stage_layers``, published CIFAR-10: 5 -> 11 -> 17 cells,
``stage_epochs`` 25 each). Within a stage it is first-order DARTS (or 2nd order, or PC-DARTS
with the partial-channel space) with:

* arch updates only from ``pdarts.arch_start_epoch`` (10) epochs into each stage, the weight lr
  schedule restarted every stage (the reference builds a new cosine scheduler per stage);
* op-level dropout on the skip-connect branches, initial rate ``skip_dropout[stage]``
  (published 0.1, 0.4, 0.7), decaying as the reference: ``p0 * (E - e - 1) / E`` during the
  warm-up epochs e < A, then ``p0 * exp(-decay * (e - A))``. Applied in the weight step only
  (deviation, documented): the arch gradient, and the DSRNA robustness bound (which must be
  deterministic), are taken on the network that is being derived;
* at the end of every stage but the last, search-space approximation: on every edge keep the
  ``keep_ops[stage]`` ops with the largest alpha (8 -> 5 -> 3; ``none`` competes like any op,
  as in the reference's non-final stages), then "the supernet changes here": the loop
  rebuilds a deeper supernet holding only those ops, with fresh weights and fresh alpha;
* after the last stage, the genotype is parsed DARTS-style on the remaining ops (``none``
  excluded) with at most ``pdarts.max_skip`` (2) skip-connects in the normal cell: while there
  are more, the chosen skip with the smallest weight is removed and the cell re-parsed (the
  reference's ``delete_min_sk_prob`` + ``keep_1_on`` + ``keep_2_branches``).

Resume: the stage and the per-edge op lists are strategy state in every checkpoint; a resumed
run rebuilds the stage's supernet before loading the weights.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import ConfigError, SearchConfig, SupernetConfig, replace
from ..space.supernet import num_edges
from .base import STRATEGIES
from .darts import DARTS

Mask = Dict[str, torch.Tensor]


def stage_starts(stage_epochs: Tuple[int, ...]) -> List[int]:
    out, t = [], 0
    for e in stage_epochs:
        out.append(t)
        t += e
    return out


def skip_dropout_rate(p0: float, epoch_in_stage: int, stage_epochs: int, arch_start: int, decay: float) -> float:
    """The reference schedule (train_search.py): linear decay before arch updates, then exponential."""
    if epoch_in_stage < arch_start:
        return p0 * (stage_epochs - epoch_in_stage - 1) / stage_epochs
    return p0 * math.exp(-(epoch_in_stage - arch_start) * decay)


def prune_ops(alpha: torch.Tensor, mask: torch.Tensor, keep: int, primitives: Tuple[str, ...]) -> torch.Tensor:
    """Per edge, keep the ``keep`` allowed ops with the largest alpha (ties: lower index).

    Softmax is monotone, so ranking alpha ranks the mixing weights. An edge must keep one op
    other than ``none`` (else it has nothing to run); if the top ``keep`` are all ``none``,
    the best non-none op replaces the weakest kept one.
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    none = primitives.index("none") if "none" in primitives else -1
    for e, (row, allowed) in enumerate(zip(alpha.tolist(), mask.tolist())):
        cand = [k for k in range(len(row)) if allowed[k]]
        ranked = sorted(cand, key=lambda k: (-row[k], k))
        kept = ranked[:keep]
        if all(k == none for k in kept):
            kept = kept[:-1] + [next(k for k in ranked if k != none)]
        out[e, kept] = True
    return out


@STRATEGIES.register("pdarts")
class PDARTS(DARTS):
    name = "pdarts"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.stage = 0
        self.masks: Optional[Mask] = None  # None: every op on every edge (stage 0)
        self.starts = stage_starts(self.cfg.pdarts.stage_epochs)

    @classmethod
    def check_config(cls, cfg: SearchConfig) -> None:
        super().check_config(cfg)
        p = cfg.pdarts
        n = len(p.stage_layers)
        if n < 1:
            raise ConfigError("key 'pdarts.stage_layers': needs at least one stage")
        for key, want in (("stage_epochs", n), ("skip_dropout", n), ("keep_ops", n - 1)):
            if len(getattr(p, key)) != want:
                raise ConfigError(f"key 'pdarts.{key}': {len(getattr(p, key))} entries for {n} stages "
                                  f"(pdarts.stage_layers={list(p.stage_layers)}); needs {want}")
        if sum(p.stage_epochs) != cfg.epochs:
            raise ConfigError(f"key 'pdarts.stage_epochs': the stages sum to {sum(p.stage_epochs)} epochs "
                              f"but epochs={cfg.epochs}; set epochs to the sum")
        if any(e < 1 for e in p.stage_epochs) or any(l < 1 for l in p.stage_layers):
            raise ConfigError("key 'pdarts.stage_epochs'/'pdarts.stage_layers': entries must be >= 1")
        n_ops = len(cfg.model.primitives)
        prev = n_ops
        for k in p.keep_ops:
            if not 1 <= k <= prev:
                raise ConfigError(f"key 'pdarts.keep_ops': {list(p.keep_ops)} must be non-increasing "
                                  f"counts within 1..{n_ops} (model.primitives has {n_ops} ops)")
            prev = k
        if cfg.strategy.arch_start_epoch:
            raise ConfigError("key 'strategy.arch_start_epoch': pdarts delays arch updates in every stage "
                              "by pdarts.arch_start_epoch; leave strategy.arch_start_epoch at 0")
        if cfg.strategy.max_skip != -1:
            raise ConfigError("key 'strategy.max_skip': pdarts caps the final cell's skip_connects with "
                              "pdarts.max_skip; leave strategy.max_skip at -1")
        if any(not 0.0 <= r < 1.0 for r in p.skip_dropout):
            raise ConfigError(f"key 'pdarts.skip_dropout': rates must lie in [0, 1), got {list(p.skip_dropout)}")

    # ------------------------------------------------------------------ schedule
    def stage_of(self, epoch: int) -> int:
        s = 0
        for i, start in enumerate(self.starts):
            if epoch >= start:
                s = i
        return s

    def epoch_in_stage(self, epoch: int) -> int:
        return epoch - self.starts[self.stage_of(epoch)]

    def lr_position(self, epoch: int) -> Tuple[int, int]:
        return self.epoch_in_stage(epoch), self.cfg.pdarts.stage_epochs[self.stage_of(epoch)]

    def arch_lr_position(self, epoch: int) -> Tuple[int, int, int]:
        return (self.epoch_in_stage(epoch), self.cfg.pdarts.arch_start_epoch,
                self.cfg.pdarts.stage_epochs[self.stage_of(epoch)])

    def arch_active(self, epoch: int) -> bool:
        return self.epoch_in_stage(epoch) >= self.cfg.pdarts.arch_start_epoch

    def skip_rate(self, epoch: int) -> float:
        p, s = self.cfg.pdarts, self.stage_of(epoch)
        return skip_dropout_rate(p.skip_dropout[s], self.epoch_in_stage(epoch), p.stage_epochs[s],
                                 p.arch_start_epoch, p.dropout_decay)

    # ------------------------------------------------------------------ steps
    def weight_step(self, x, y, *, epoch: int, step: int) -> Dict[str, float]:
        rate = self.skip_rate(epoch)
        self.model.set_skip_dropout(rate)
        try:
            logs = super().weight_step(x, y, epoch=epoch, step=step)
        finally:
            self.model.set_skip_dropout(0.0)
        logs["skip_dropout"] = rate
        return logs

    # ------------------------------------------------------------------ lifecycle
    def supernet_config(self) -> SupernetConfig:
        return replace(self.cfg.model, layers=self.cfg.pdarts.stage_layers[self.stage])

    def supernet_mask(self) -> Optional[Mask]:
        return self.masks

    def current_mask(self) -> Mask:
        if self.masks is not None:
            return self.masks
        shape = (num_edges(self.cfg.model.nodes), len(self.cfg.model.primitives))
        return {k: torch.ones(shape, dtype=torch.bool) for k in ("normal", "reduce")}

    def approximate_space(self, keep: int) -> Mask:
        """Search-space approximation: the top-``keep`` ops per edge of the current alpha."""
        cur = self.current_mask()
        alphas = {"normal": self.model.alphas_normal, "reduce": self.model.alphas_reduce}
        return {k: prune_ops(alphas[k].detach().float().cpu(), cur[k], keep, tuple(self.cfg.model.primitives))
                for k in ("normal", "reduce")}

    def on_epoch_end(self, epoch: int, genotype: Any = None, logs: Optional[Dict[str, float]] = None) -> bool:
        super().on_epoch_end(epoch, genotype, logs)
        p = self.cfg.pdarts
        s = self.stage_of(epoch)
        last_of_stage = epoch == self.starts[s] + p.stage_epochs[s] - 1
        if not last_of_stage or s == len(p.stage_layers) - 1:
            return False
        self.masks = self.approximate_space(p.keep_ops[s])
        self.stage = s + 1
        return True

    def genotype(self) -> Any:
        return self.model.derive(self.cfg.pdarts.max_skip)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["stage"] = self.stage
        state["op_masks"] = None if self.masks is None else {k: v.tolist() for k, v in self.masks.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage = int(state.get("stage", 0))
        masks = state.get("op_masks")
        self.masks = None if masks is None else {k: torch.tensor(v, dtype=torch.bool) for k, v in masks.items()}
