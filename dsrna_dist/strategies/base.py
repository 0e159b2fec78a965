"""The search-strategy interface: how one step moves the weights w and the architecture alpha.

Lifecycle (NASLib-style; ``search.py``'s loop calls these for every strategy, in this order):

    on_search_start()                       once, after the supernet is built (or restored)
    should_stop() -> reason | None          before every epoch (a resumed, stopped run ends here)
    on_epoch_start(epoch)                   then ``step`` per batch, at ``lr_position(epoch)``
                                            (weights) and ``arch_lr_position(epoch)`` (alpha)
    on_epoch_end(epoch, genotype, logs)     True = "the supernet changes here": the loop rebuilds
                                            model, optimizers and DDP wrapper from
                                            ``supernet_config()`` / ``supernet_mask()`` through
                                            one function and calls ``bind(ctx)``
    should_stop()                           after the epoch's checkpoint (reason -> summary.json)
    on_search_end() -> Genotype | None      a strategy may replace the derived genotype (RobNet)

Checkpoints: ``state_dict`` holds what the supernet shape depends on (P-DARTS: stage and
per-edge op lists); on resume the loop loads it first and rebuilds the supernet when
``supernet_config``/``supernet_mask`` differ from the default, then loads the weights.
The stopping rule (``stopping:`` section, e.g. DARTS+) lives here, so any strategy has it.

Distributed contract (see notes/distributed-on-cpu.md, "Bi-level under DDP"):

* the weight step runs through ``net`` (DDP-wrapped when world_size > 1), so the weight
  gradients are all-reduced by DDP's bucketed hooks; the arch weights enter it *detached*
  (no wasted alpha gradient, and DDP never sees alpha);
* alpha/beta are excluded from DDP (``Supernet`` arch params are on DDP's ignore list); every
  arch-gradient computation uses ``torch.autograd.grad`` on the unwrapped ``model`` (which
  fires no DDP hook) and ends with an explicit mean all-reduce of the arch gradients, so
  Adam sees bit-identical gradients and alpha stays bit-identical on every rank; with a
  robustness metric the loss and R gradients are reduced separately and combined after the
  reduction (:meth:`SearchStrategy.combine_arch_grads`), from norms every rank computes alike;
* random perturbations (SDARTS) come from generators seeded by (seed, global step), the same
  on every rank, and PGD gradients are all-reduced: each rank perturbs identically, exactly
  as one process with the global batch would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, SearchConfig, SupernetConfig
from ..engine.sync import all_reduce_mean_, any_rank
from ..registry import Registry
from ..robustness.base import metric_forward
from ..space.supernet import ArchWeights, Supernet

STRATEGIES: Registry[type] = Registry("search strategy")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the step was not applied."""


@dataclass
class SearchContext:
    """Everything a strategy acts on. ``net`` is ``model`` or its DDP wrapper."""

    cfg: SearchConfig
    model: Supernet
    net: nn.Module
    w_optim: torch.optim.Optimizer
    a_optim: torch.optim.Optimizer
    metric: Any = None  # dsrna_dist.robustness.RobustnessMetric | None
    seed: int = 0
    logs: Dict[str, float] = field(default_factory=dict)
    train_loader: Any = None  # the search halves (RobNet's ranking reads the val half)
    val_loader: Any = None
    steps: int = 0  # steps per epoch


ARCH_GRAD_LIMIT = 1e15  # see SearchStrategy._apply_arch_grads


def grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a list of tensors, in float64 (no overflow for any finite float32)."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.detach().argmax(1) == y).float().mean().item()


class SearchStrategy:
    """DARTS-style alternation: (arch step on a val batch) then (weight step on a train batch)."""

    name = ""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.model = ctx.model
        self.check_config(ctx.cfg)

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: SearchConfig) -> None:
        """Raise ConfigError (naming the key) when the config does not fit this strategy."""
        if cfg.strategy.order == 2 and cfg.optim.name != "sgd":
            raise ConfigError("key 'strategy.order': the 2nd-order (unrolled) step models an SGD "
                              f"update and needs optim.name=sgd, got {cfg.optim.name!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def arch_params(self) -> List[nn.Parameter]:
        return self.model.arch_parameters()

    @property
    def weight_params(self) -> List[nn.Parameter]:
        return self.model.weight_parameters()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.optim.label_smoothing)

    def arch_active(self, epoch: int) -> bool:
        return epoch >= self.cfg.strategy.arch_start_epoch

    def arch_terms(self, x: torch.Tensor, y: torch.Tensor, logs: Dict[str, float],
                   update_metric: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(val_loss, R) on the unwrapped model; R is None without a robustness metric."""
        metric = self.ctx.metric
        if metric is not None:  # lets a metric that needs d logits / d x reuse this forward
            x = x.detach().requires_grad_(True)
        logits, extra = metric_forward(self.model, metric, x, y)
        loss = self.loss(logits, y)
        logs["val_loss"] = loss.item()
        logs["val_acc"] = accuracy(logits, y)
        if metric is None:
            return loss, None
        r, mlogs = metric(self.model, x, y, logits=logits, extra=extra, update=update_metric)
        logs["R"] = float(r.detach())
        if any_rank(not math.isfinite(logs["R"]), r.device):  # every rank stops together
            raise NonFiniteLossError(
                f"robustness metric {metric.name!r} gave a non-finite R in the architecture step "
                f"(R = {logs['R']:.4g} on this rank): its bounds overflowed. Interval-based bounds "
                f"grow geometrically with depth; use a smaller robustness.certified.eps, fewer cells or the "
                f"PC-DARTS space (partial channels)")
        logs.update({f"metric/{k}": float(v) for k, v in mlogs.items()})
        return loss, r

    def arch_objective(self, x: torch.Tensor, y: torch.Tensor, logs: Dict[str, float],
                       update_metric: bool = True) -> torch.Tensor:
        """val_loss - gamma * R (the paper's fixed gamma; see :meth:`combine_arch_grads` for
        the trade-off the arch steps apply)."""
        loss, r = self.arch_terms(x, y, logs, update_metric)
        return loss if r is None else loss - self.cfg.robustness.gamma * r

    def combine_arch_grads(self, g_loss: Sequence[torch.Tensor], g_r: Sequence[torch.Tensor],
                           logs: Dict[str, float]) -> List[torch.Tensor]:
        """The applied arch gradient g_L - gamma_eff * dR/dalpha from the two LOCAL gradients.

        Both are mean-reduced over ranks first (one all-reduce), and their norms are taken in
        float64 from the reduced tensors, so gamma_eff is the same Python float on every rank
        and needs no state (a resumed search computes it the same way). ``trade_off: gamma``:
        gamma_eff = gamma (paper eq. 16); ``share``: gamma_eff = share * ||g_L|| / ||dR/dalpha||,
        so the robustness part of the step is that fraction of the loss part, whatever the
        scale of R (DSRNA-CB's loose bounds make dR/dalpha ~1e15 times the loss gradient on an
        untrained supernet; the Jacobian term is ~1e-3 of it). Logs ``grad_share`` =
        ||gamma_eff dR/dalpha|| / ||g_L|| and ``gamma_eff``. Returns reduced gradients."""
        g_loss, g_r = [g.clone() for g in g_loss], [g.clone() for g in g_r]
        all_reduce_mean_(g_loss + g_r)
        n_l, n_r = grad_norm(g_loss), grad_norm(g_r)
        if not (math.isfinite(n_l) and math.isfinite(n_r)):  # reduced: every rank agrees
            raise NonFiniteLossError(f"non-finite architecture gradient (||dL/dalpha|| = {n_l:.4g}, "
                                     f"||dR/dalpha|| = {n_r:.4g})")
        rc = self.cfg.robustness
        if rc.trade_off == "share":
            gamma = rc.share * n_l / n_r if n_r > 0.0 else 0.0
        else:
            gamma = rc.gamma
        logs["grad_share"] = gamma * n_r / n_l if n_l > 0.0 else (0.0 if gamma * n_r == 0.0 else math.inf)
        logs["gamma_eff"] = gamma
        return [a - gamma * b for a, b in zip(g_loss, g_r)]

    def _apply_arch_grads(self, grads: Sequence[Optional[torch.Tensor]], reduced: bool = False) -> None:
        """Set alpha.grad, mean-reduce it over ranks (unless ``reduced`` already), take the Adam step."""
        self.ctx.a_optim.zero_grad(set_to_none=True)
        for p, g in zip(self.arch_params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach().clone()
        if not reduced:
            all_reduce_mean_([p.grad for p in self.arch_params])
        # float32 Adam squares the gradient: above ~1e19 its second moment is inf and the step
        # silently 0. A huge robustness term (DSRNA-CB's loose bounds on the full DARTS space)
        # gets there, so scale such gradients down to max |g| = ARCH_GRAD_LIMIT (no-op below it;
        # Adam is scale-invariant up to eps). No host sync: the scale stays a tensor.
        grads_ = [p.grad for p in self.arch_params]
        peak = torch.stack([g.abs().max() for g in grads_]).max()
        scale = (peak / ARCH_GRAD_LIMIT).clamp(min=1.0)
        for g in grads_:
            g.div_(scale)
        self.ctx.a_optim.step()

    def grads_of(self, out: torch.Tensor, params: Sequence[torch.Tensor],
                 retain_graph: bool = False) -> List[torch.Tensor]:
        gs = torch.autograd.grad(out, list(params), allow_unused=True, retain_graph=retain_graph)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]

    # ------------------------------------------------------------------ steps
    def perturbation(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> Optional[ArchWeights]:
        """Arch weights to run the weight step at (None: the current, unperturbed ones)."""
        return None

    def arch_step(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                  *, epoch: int, step: int, lr: float) -> Dict[str, float]:
        """First-order DARTS: d(val objective)/d(alpha) at the current weights; with a metric,
        the loss and R gradients separately, combined by :meth:`combine_arch_grads`."""
        logs: Dict[str, float] = {}
        loss, r = self.arch_terms(xv, yv, logs)
        if r is None:
            self._apply_arch_grads(self.grads_of(loss, self.arch_params))
            return logs
        g_l = self.grads_of(loss, self.arch_params, retain_graph=True)
        g_r = self.grads_of(r, self.arch_params)
        self._apply_arch_grads(self.combine_arch_grads(g_l, g_r, logs), reduced=True)
        return logs

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, step: int) -> Dict[str, float]:
        override = self.perturbation(x, y, epoch, step)
        if override is None:
            override = {k: v.detach() for k, v in self.model.arch_weights().items()}
        opt = self.ctx.w_optim
        opt.zero_grad(set_to_none=True)
        logits = self.ctx.net(x, override)
        loss = self.loss(logits, y)
        loss.backward()  # DDP all-reduces the weight gradients here
        params = [p for p in self.weight_params if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = (nn.utils.clip_grad_norm_(params, clip) if clip > 0
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        # the norm comes from all-reduced gradients (a NaN on any rank reaches every rank),
        # so every rank takes the same decision and none is left waiting in a collective
        if not math.isfinite(float(norm)):
            raise NonFiniteLossError(f"non-finite training loss/gradient at epoch {epoch} step {step} "
                                     f"(loss={loss.item():.4g}, grad norm={float(norm):.4g})")
        opt.step()
        return {"train_loss": loss.item(), "train_acc": accuracy(logits, y), "grad_norm": float(norm)}

    def step(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
             *, epoch: int, step: int, lr: float) -> Dict[str, float]:
        logs: Dict[str, float] = {}
        if self.arch_active(epoch):
            logs.update(self.arch_step(xt, yt, xv, yv, epoch=epoch, step=step, lr=lr))
        logs.update(self.weight_step(xt, yt, epoch=epoch, step=step))
        return logs

    # ------------------------------------------------------------------ lifecycle
    def supernet_config(self) -> SupernetConfig:
        """The supernet the current phase searches (P-DARTS: deeper each stage)."""
        return self.cfg.model

    def supernet_mask(self) -> Optional[Dict[str, torch.Tensor]]:
        """Per-edge op lists as bool [edges, ops] masks (None: every op on every edge)."""
        return None

    def bind(self, ctx: SearchContext) -> None:
        """Point the strategy at a rebuilt supernet / optimizers / DDP wrapper."""
        self.ctx = ctx
        self.model = ctx.model

    def _stopper(self):
        if not hasattr(self, "_stopping_rule"):
            from .dartsplus import build_stopping_rule

            self._stopping_rule = build_stopping_rule(self.cfg)
        return self._stopping_rule

    def on_search_start(self) -> None:
        """Once, after the supernet is built or restored."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of ``epoch``."""

    def on_epoch_end(self, epoch: int, genotype: Any = None, logs: Optional[Dict[str, float]] = None) -> bool:
        """After the epoch's steps, with its derived genotype; True = rebuild the supernet."""
        rule = self._stopper()
        if rule is not None:
            rule.update(epoch, self.model, genotype)
        return False

    def should_stop(self) -> Optional[str]:
        """A reason to end the search now (logged, written to summary.json), or None."""
        rule = self._stopper()
        return None if rule is None else rule.reason

    def lr_position(self, epoch: int) -> Tuple[int, int]:
        """(epoch, epochs) for the weight lr schedule (P-DARTS restarts it every stage)."""
        return epoch, self.cfg.epochs

    def arch_lr_position(self, epoch: int) -> Tuple[int, int, int]:
        """(epoch, first arch-active epoch, epochs) for a decaying arch lr (arch_optim.schedule):
        one decay over the search. P-DARTS restarts it every stage, whose fresh alpha must
        move again (one decay over the whole search leaves its last stage ~1-12% of the lr)."""
        return epoch, self.cfg.strategy.arch_start_epoch, self.cfg.epochs

    def genotype(self) -> Any:
        """The cell the current alpha encodes (the loop derives it after every epoch)."""
        return self.model.derive(self.cfg.strategy.max_skip)

    def on_search_end(self) -> Any:
        """After the last epoch; a Genotype replaces the derived one (None keeps it)."""
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Strategy state beyond model/optimizers (randomness is a function of the step)."""
        state: Dict[str, Any] = {"name": self.name}
        rule = self._stopper()
        if rule is not None:
            state["stopping"] = rule.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint was written by strategy {state.get('name')!r}, "
                             f"this run uses {self.name!r}")
        rule = self._stopper()
        if rule is not None and state.get("stopping"):
            rule.load_state_dict(state["stopping"])


def build_strategy(ctx: SearchContext) -> SearchStrategy:
    return STRATEGIES.get(ctx.cfg.strategy.name, key="strategy.name")(ctx)
