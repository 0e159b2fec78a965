"""DSRNA-CB: the certified margin lower bound of paper section 3.1.1 as a differentiable metric.

For each example the bound engine (:mod:`dsrna_dist.bounds`, CROWN-IBP by default) gives lower
bounds lb_j of the margin f_y(x') - f_j(x') over the ball ||x' - x|| <= eps (clipped to the
[0, 1] pixel box), for every j != y. The per-example robustness is

    reduction="min"  (default): min_{j != y} lb_j  -- the certificate itself: > 0 iff certified
    reduction="mean":           mean_{j != y} lb_j -- smoother (a gradient through every class)
    reduction="mean_margin":    a lower bound of the mean margin f_y - mean_{j != y} f_j itself,
                                from ONE specification row e_y - mean_{j != y} e_j

``mean_margin`` is sound (a bound of that linear function of the logits) and never looser than
``mean``: a linear relaxation's bound is superadditive in the specification (each ReLU picks
its best line for the summed coefficient; min over x of a sum >= sum of the mins), so
bound(mean_j c_j) >= mean_j bound(c_j). Its backward pass has 1 row instead of K-1, which is
what makes CROWN-IBP affordable inside an architecture step (BENCHMARKS.md).

and R is its mean over the (first ``batch_fraction`` of the) batch.

BatchNorm statistics (search runs BN in train mode): ``bn_stats="objective"`` (default) bounds
the network with the statistics of the architecture objective's forward of the whole val batch
-- the very function whose loss is minimised -- captured by :meth:`forward_context`, which
also lets the bound engine skip its own clean pass (a third of the IBP work). Called without
that context (or with ``bn_stats="own"``) the engine normalises with the statistics of the
metric's own examples, as a separate forward of them would. R is differentiable w.r.t.
the weights and the architecture parameters, because the bounds are built from the same
modules, scaled by the same softmax(alpha) (and PC-DARTS betas) as the forward pass.

Adaptive eps. The paper (4.2.2): "we initialized eps as 0.03, and then linearly increased or
decreased it based on the global difference between the certified upper bound and lower
bound". Read as a controller, its job is to keep the certified bound informative: hold eps at
the radius where the global gap

    g = mean over all examples of all ranks and all j != y of (ub_j - lb_j)

(an all-reduce when torch.distributed is initialised, so every rank sees the same g; ub from
the same engine at the same eps) equals ``eps_target_gap``. A gap wider than the target means
the relaxation is loose at this eps (the bound says little about the architecture, and its
alpha gradient rewards parameter-free ops for being easy to bound), so eps shrinks; a tight
gap lets eps grow. On every call with ``update=True`` (every ``eps_every``-th one) the rule
moves eps for the next call::

    log (default in the shipped DSRNA-CB configs): a damped Newton step in log-log space,
        ln eps <- ln eps + clip(eps_gain * ln(eps_target_gap / g) / s, -eps_log_step, +eps_log_step)
        where s = d ln g / d ln eps is estimated online by a secant between consecutive
        measurements whose eps differ by a factor >= e^0.5 (clipped to [0.25, 8], averaged in log space with the previous
        estimate; 1 before any). Small steps near the target do not re-estimate s, so neither a
        noisy gap (another batch every step) nor its drift as the weights train corrupts it. The gap of a deep net spans
        many decades in eps (measured on the untrained paper-size CIFAR-10 supernet: 1.5e16 at
        eps 0.03, 5e7 at 1e-4), which a linear rule cannot cross: this one moves eps by up to a
        factor exp(eps_log_step) per update and lands on the target in a few Newton steps,
        then follows it as the weights train.
    sign:          eps <- eps + eps_step * sign(eps_target_gap - g)           (linear, literal)
    proportional:  eps <- eps + eps_step * clip((eps_target_gap - g) / eps_target_gap, -1, 1)
    fixed:         eps never changes

and every rule clips eps to [eps_min, eps_max]. A non-finite gap counts as too wide (the log
rule then takes its largest shrinking step); a zero gap as too narrow. With ``eps_every = n``
only the updating calls pay for the upper bounds (a second specification row, or a second set
of K-1 rows, in the CROWN backward pass). eps, the call count and the log rule's slope and last
point live in :meth:`state_dict`, so a resumed search continues exactly; every update is
computed in Python floats from the all-reduced gap, so eps is identical on every rank. Each
call logs ``eps`` (the radius it bounded at) and, when it measured one, ``bound_gap``.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..config import CertifiedMetricConfig, ConfigError, RobustnessConfig
from ..engine.unwrap import unwrap_model
from .base import METRICS, RobustnessMetric, batch_subset


def num_classes(model: nn.Module) -> int:
    """Number of logits: ``model.num_classes`` if set, else the last Linear's out_features."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("certified metric: cannot tell the number of classes "
                         "(no num_classes attribute and no nn.Linear in the model)")
    return linears[-1].out_features


def margin_spec(y: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """C [B, K-1, K] with rows e_y - e_j for the K-1 classes j != y, and those j [B, K-1]."""
    b = y.shape[0]
    idx = torch.arange(k, device=y.device).expand(b, k)
    others = idx[idx != y[:, None]].view(b, k - 1)
    c = torch.zeros(b, k - 1, k, device=y.device, dtype=dtype)
    c.scatter_(2, y[:, None, None].expand(b, k - 1, 1), 1.0)
    c.scatter_(2, others[:, :, None], -1.0)
    return c, others


def global_mean(values: torch.Tensor) -> float:
    """Mean of ``values`` over all ranks (exact for unequal sizes: all-reduced sum and count)."""
    acc = torch.stack([values.detach().double().sum(),
                       torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(acc)
    s, n = acc.tolist()
    return s / max(n, 1.0)


SLOPE_RANGE = (0.25, 8.0)  # d ln gap / d ln eps: IBP-style bounds are >= linear in eps
SLOPE_MIN_MOVE = 0.5  # |change of ln eps| needed to measure the slope: a noisy gap (another
# batch every step, weights moving) over a short eps interval gives a meaningless secant


class LogEpsState:
    """The log rule's memory: the slope estimate and the last (ln eps, ln gap) measured."""

    def __init__(self, slope: float = 1.0, last: Optional[Tuple[float, float]] = None,
                 measured: bool = False) -> None:
        self.slope = slope
        self.last = last
        self.measured = measured

    def state_dict(self) -> Dict[str, Any]:
        return {"slope": self.slope, "last": None if self.last is None else list(self.last),
                "measured": self.measured}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.slope = float(state.get("slope", 1.0))
        self.measured = bool(state.get("measured", False))
        last = state.get("last")
        self.last = None if last is None else (float(last[0]), float(last[1]))


def next_eps(eps: float, gap: float, cfg: "CertifiedMetricConfig | RobustnessConfig",
             state: Optional[LogEpsState] = None) -> float:
    """The eps rule of the module docstring (a function of floats: identical on all ranks).
    ``cfg``: the ``robustness.certified`` section (or the whole ``robustness``); ``state``: the log
    rule's memory, updated in place (a fresh one if None)."""
    cfg = getattr(cfg, "certified", cfg)
    if cfg.eps_rule == "fixed":
        return eps
    if cfg.eps_rule == "log":
        return _next_eps_log(eps, gap, cfg, state if state is not None else LogEpsState())
    rel = (cfg.eps_target_gap - gap) / cfg.eps_target_gap if math.isfinite(gap) else -1.0
    step = math.copysign(1.0, rel) if cfg.eps_rule == "sign" else max(-1.0, min(1.0, rel))
    if cfg.eps_rule == "sign" and rel == 0.0:
        step = 0.0
    return min(cfg.eps_max, max(cfg.eps_min, eps + cfg.eps_step * step))


def _next_eps_log(eps: float, gap: float, cfg: CertifiedMetricConfig, st: LogEpsState) -> float:
    le = math.log(eps)
    if not math.isfinite(gap) or gap <= 0.0:  # overflowed: shrink; exactly tight: grow; no slope
        step = -cfg.eps_log_step if not math.isfinite(gap) else cfg.eps_log_step
        st.last = None
    else:
        lg = math.log(gap)
        if st.last is not None and abs(le - st.last[0]) >= SLOPE_MIN_MOVE:
            new = min(SLOPE_RANGE[1], max(SLOPE_RANGE[0], (lg - st.last[1]) / (le - st.last[0])))
            # the first measurement replaces the guess; later ones are averaged in (geometric mean)
            st.slope = math.sqrt(st.slope * new) if st.measured else new
            st.measured = True
        st.last = (le, lg)
        step = cfg.eps_gain * (math.log(cfg.eps_target_gap) - lg) / st.slope
        step = max(-cfg.eps_log_step, min(cfg.eps_log_step, step))
    return min(cfg.eps_max, max(cfg.eps_min, math.exp(le + step)))


@METRICS.register("certified")
class CertifiedMetric(RobustnessMetric):
    """DSRNA-CB (see the module docstring). Holds one BoundedModel per model, built lazily."""

    name = "certified"

    def __init__(self, cfg: RobustnessConfig) -> None:
        super().__init__(cfg)
        c = cfg.certified
        if c.eps_min > c.eps_max:
            raise ConfigError(f"key 'robustness.certified.eps_min': {c.eps_min} is above "
                              f"robustness.certified.eps_max={c.eps_max}")
        self.eps = min(c.eps_max, max(c.eps_min, c.eps))
        self.log_state = LogEpsState()
        self.updates = 0
        self.calls = 0  # calls with update=True: the eps_every schedule
        self._bounded: Any = None
        self._bounded_for: Optional[weakref.ref] = None
        self._classes = 0  # num_classes of that model (a module scan: once, not per call)
        self._captured: Optional[Dict[Any, Any]] = None

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module) -> Iterator[None]:
        """``bn_stats="objective"``: capture the BN batch statistics of the caller's forward
        (the arch objective's val batch) for the next call, which then bounds that very
        function without a clean pass of its own (value-free propagation)."""
        if self.cfg.bn_stats != "objective":
            yield
            return
        from ..bounds import capture_bn_stats
        with capture_bn_stats(model, self.bounded_model(model).bn_modules) as stats:
            yield
        self._captured = stats

    def bounded_model(self, model: nn.Module) -> Any:
        """The (cached) BoundedModel of the unwrapped model; rebuilt only for a different model."""
        mod = unwrap_model(model)
        if self._bounded is None or self._bounded_for is None or self._bounded_for() is not mod:
            from ..bounds import BoundedModel  # import late: bounds is optional for other metrics
            self._bounded = BoundedModel(mod, max_pool=self.cfg.certified.max_pool)
            self._bounded_for = weakref.ref(mod)
            self._classes = num_classes(mod)
        return self._bounded

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 logits: Optional[torch.Tensor] = None,
                 extra: Optional[torch.Tensor] = None,
                 update: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg, cc = self.cfg, self.cfg.certified
        xs, ys = batch_subset(x.detach(), y, cfg.batch_fraction)
        bm = self.bounded_model(model)
        k = self._classes
        eps = self.eps
        adapt = update and cc.eps_rule != "fixed" and self.calls % cc.eps_every == 0
        if update:
            self.calls += 1
        stats, self._captured = self._captured, None  # from forward_context, for this call only
        c, _ = margin_spec(ys, k, xs.dtype)
        if cc.reduction == "mean_margin":
            c = c.mean(dim=1, keepdim=True)  # [B, 1, K]: e_y - mean_{j != y} e_j
        # the upper bounds only feed the eps rule: skip their (CROWN) backward pass otherwise
        lb, ub = bm.bounds(xs, eps, norm=cfg.norm, method=cc.method, C=c, need_upper=adapt,
                           bn_stats=stats)
        per = lb.min(dim=1).values if cc.reduction == "min" else lb.mean(dim=1)
        r = per.mean()
        logs: Dict[str, float] = {"R": float(r.detach()), "eps": eps}
        if cc.reduction != "mean_margin":  # per-class bounds: the certificate is their min
            logs["certified_frac"] = float((lb.detach().min(dim=1).values > 0).float().mean())
        if adapt:
            gap = global_mean(ub.detach() - lb.detach())
            self.eps = next_eps(eps, gap, cc, self.log_state)
            self.updates += 1
            logs["bound_gap"] = gap
        return r, logs

    def state_dict(self) -> Dict[str, Any]:
        state = {"eps": self.eps, "updates": self.updates, "calls": self.calls}
        if self.cfg.certified.eps_rule == "log":
            state["log_rule"] = self.log_state.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = {"eps", "updates"} - set(state)
        if missing:
            raise ValueError(f"certified metric state lacks {sorted(missing)}")
        self.eps = float(state["eps"])
        self.updates = int(state["updates"])
        self.calls = int(state.get("calls", self.updates))  # checkpoints before eps_every: one update per call
        self.log_state = LogEpsState()
        if "log_rule" in state:
            self.log_state.load_state_dict(state["log_rule"])
