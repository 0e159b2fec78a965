"""DSRNA-Jacobian: the Jacobian norm bound of paper section 3.1.2 as a differentiable metric.

Paper, formula (15), for an l_p threat model of radius delta and q the dual exponent
(1/p + 1/q = 1)::

    R = -(delta / N) * sum_i (1/K) * sum_k ||J_k(x_i)||_q          J_k = d f_k / d x (row k)

``estimator="paper"`` computes exactly this: the K rows of every example's J come from K
vector-Jacobian products with the one-hot vectors e_k (looped, or vmapped with
``is_grads_batched``) through a forward in which the examples do not interact (see BatchNorm
below), then the per-row q-norm (q = 1 for l_inf, q = 2 for l_2).

What the paper says vs. what the formula is: the paper calls sum_k ||J_k||_2 "the Frobenius
norm" of J and says it uses the random-projection method of Hoffman et al. (2019). Neither is
exact: the Frobenius norm is sqrt(sum_k ||J_k||_2^2) (not the sum of row norms), and the
random-projection estimator estimates the *squared* Frobenius norm ||J||_F^2 (Hoffman et al.
weight it by lambda/2). No unbiased projection estimator of the sum of row norms exists, so
``estimator="paper"`` keeps formula (15) with exact row norms, and ``estimator="frobenius_sq"``
(l_2 only) is the cheap alternative::

    R = -(delta / N) * sum_i (1/K) * ||J(x_i)||_F^2,   ||J||_F^2 ~= (K / P) * sum_p ||v_p^T J||_2^2

with v_p uniform on the unit sphere of R^K (E[v v^T] = I / K, so the estimate is unbiased) and
P = ``cfg.jacobian.projections`` VJPs. That is formula (15) with the row norms squared.

``estimator="frobenius_sq_fd"`` estimates the same ||J||_F^2 without any double backward: with
u ~ N(0, I_D) in input space, E[||J u||^2] = ||J||_F^2, and J u is taken by a finite difference
(f(x + h u) - f(x)) / h, h = ``cfg.jacobian.fd_step``. The clean and the P perturbed copies go through
one forward (so BatchNorm normalises them with the same batch statistics), and the gradient is
an ordinary backward through that forward: about the cost of one more training step on the
metric's examples, where a VJP-based estimate costs a double backward (~3x). Bias: O(h) from
the curvature of f (ReLU kinks inside the h-ball count as an average slope).

``fd_fused`` (default on): the perturbed copies are appended to the *architecture objective's*
forward (:meth:`JacobianMetric.extra_inputs`), whose clean rows are the val batch itself, so one
forward of B + P*m rows (m = the metric's examples) serves the loss and the metric. BatchNorm's
batch statistics are then those of the joint batch: with ``batch_fraction`` 1 and P = 1 that
is the clean batch's to O(h) (every example appears twice); with a fraction < 1 the metric's
examples weigh (P + 1) times in the statistics, which shifts the val loss slightly.

Gradients: the VJPs use ``autograd.grad(..., create_graph=True)`` and the caller backpropagates
the objective once, ordinarily; that double backward works on a DDP-wrapped model, while
``backward(create_graph=True)`` does not.

BatchNorm in train mode (as in DARTS search) couples the examples of a batch: example i's
logits depend on every x_j through the batch statistics. A VJP with one vector for the whole
batch then returns sum_j v_j^T df(x_j)/dx_i, and with the same one-hot e_k for every example it
is d(sum_j f_jk)/dx_i, which is ~0 in a DARTS supernet (every node output has zero batch mean
per channel, so sum_j f_jk does not depend on the input). The VJP estimators (``paper``,
``frobenius_sq``) therefore differentiate each example at *fixed* batch statistics
(:mod:`dsrna_dist.robustness.bn`): the statistics of the architecture objective's forward of
the whole val batch (``bn_stats: objective``, captured by :meth:`JacobianMetric.forward_context`)
or of the metric's own examples (``bn_stats: own``, or when called without that context), kept
on the graph of the weights and alpha but cut from the input. Each VJP row is then exactly the
per-example Jacobian row of the function the search evaluates for that example; it differs from
the diagonal block d f(x_i)/d x_i of the batched function only by example i's own O(1/B) pull on
the statistics (tests/test_jacobian_bn.py). This costs one extra forward of the metric's
examples. In eval mode (running statistics) nothing couples the examples and the objective's
forward is reused as before. ``frobenius_sq_fd`` needs none of this: its clean and perturbed
copies share one forward, hence one set of statistics, so the difference quotient is already
a per-example directional derivative at fixed statistics.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError, RobustnessConfig
from ..engine.unwrap import unwrap_model
from .base import METRICS, RobustnessMetric, batch_subset, first_logits
from .bn import Stats, capture_stats, frozen_stats


def jacobian_rows(f: torch.Tensor, x: torch.Tensor, *, batched: bool,
                  create_graph: bool) -> torch.Tensor:
    """All K rows of the input Jacobian, [K, B, *x.shape[1:]], via K one-hot VJPs of ``f`` [B, K]."""
    k = f.shape[1]
    eye = torch.eye(k, device=f.device, dtype=f.dtype)[:, None, :].expand(k, f.shape[0], k)
    if batched:
        (g,) = torch.autograd.grad(f, x, eye, create_graph=create_graph, retain_graph=True,
                                   is_grads_batched=True)
        return g
    return torch.stack([torch.autograd.grad(f, x, eye[i], create_graph=create_graph,
                                            retain_graph=True)[0] for i in range(k)])


def frobenius_sq_estimate(f: torch.Tensor, x: torch.Tensor, projections: int, *,
                          create_graph: bool,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Unbiased per-example estimate of ||J(x_i)||_F^2, [B], from ``projections`` VJPs.

    Hoffman et al. 2019: with v uniform on the unit sphere of R^K, ||J||_F^2 = K E[||v^T J||^2].
    """
    b, k = f.shape
    est = f.new_zeros(b)
    for _ in range(projections):
        v = torch.randn(b, k, device=f.device, dtype=f.dtype, generator=generator)
        v = v / v.norm(dim=1, keepdim=True)
        (g,) = torch.autograd.grad(f, x, v, create_graph=create_graph, retain_graph=True)
        est = est + k * g.flatten(1).pow(2).sum(1)
    return est / projections


def fd_inputs(x: torch.Tensor, projections: int, h: float, *,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[x + h u_1; ...; x + h u_P] with u_p ~ N(0, I) per example: [P * B, ...]."""
    u = torch.randn((projections,) + tuple(x.shape), device=x.device, dtype=x.dtype, generator=generator)
    return (x.unsqueeze(0) + h * u).flatten(0, 1)


def fd_frobenius_sq(f_clean: torch.Tensor, f_pert: torch.Tensor, h: float) -> torch.Tensor:
    """Per-example ||J u_p||^2 averaged over p, [B], from the logits of x and of :func:`fd_inputs`."""
    b = f_clean.shape[0]
    diff = (f_pert.unflatten(0, (-1, b)) - f_clean.unsqueeze(0)) / h  # [P, B, K] ~ J u_p
    return diff.pow(2).sum(2).mean(0)


def frobenius_sq_fd(model: nn.Module, x: torch.Tensor, projections: int, h: float, *,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, int]:
    """Per-example estimate of ||J(x_i)||_F^2, [B], from ``projections`` finite differences; and K.

    One forward of [x; x + h u_1; ...; x + h u_P] (so BatchNorm normalises all copies alike),
    in fp32 whatever the caller's autocast: at h = 0.01 bf16 rounding of trained nets' logits
    moved the estimate by a median 22-29% per example and its mean up by ~25% (BENCHMARKS
    "Finite differences under bf16").
    """
    b = x.shape[0]
    xs = torch.cat([x, fd_inputs(x, projections, h, generator=generator)])
    with torch.autocast(x.device.type, enabled=False):
        f = first_logits(model(xs))
    return fd_frobenius_sq(f[:b], f[b:], h), f.shape[1]


@contextlib.contextmanager
def running_stats_untouched(bns: List[nn.Module]) -> Iterator[None]:
    """Forwards inside leave these BNs' running statistics (and batch counters) as they were:
    the metric's extra forwards are not training steps."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0  # running <- 1 * running + 0 * batch
        yield
    finally:
        for m, mom, nbt in saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


@METRICS.register("jacobian")
class JacobianMetric(RobustnessMetric):
    """DSRNA-Jacobian (see the module docstring for the exact formulas)."""

    name = "jacobian"

    def __init__(self, cfg: RobustnessConfig) -> None:
        super().__init__(cfg)
        if cfg.jacobian.estimator.startswith("frobenius_sq") and cfg.norm != "2":
            raise ConfigError(f"key 'robustness.jacobian.estimator': {cfg.jacobian.estimator!r} estimates the l_2 "
                              f"Jacobian norm; it needs robustness.norm='2' (got {cfg.norm!r})")
        self.q = 1.0 if cfg.norm == "inf" else 2.0
        self.generator: Optional[torch.Generator] = None  # None: the global RNG of the device
        self._bn_all: List[nn.Module] = []  # every BatchNorm of the model (one module scan)
        self._bn_for: Optional[weakref.ref] = None
        self._captured: Optional[Stats] = None

    # ------------------------------------------------------------------ BatchNorm statistics
    def _vjp_based(self) -> bool:
        return self.cfg.jacobian.estimator in ("paper", "frobenius_sq")

    def batch_stat_bns(self, model: nn.Module) -> List[nn.Module]:
        """The model's BNs that use batch statistics now (the module scan is cached per model)."""
        mod = unwrap_model(model)
        if self._bn_for is None or self._bn_for() is not mod:
            self._bn_all = [m for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self._bn_for = weakref.ref(mod)
        return [m for m in self._bn_all if m.training or m.running_mean is None]

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module) -> Iterator[None]:
        """VJP estimators with ``bn_stats="objective"``: capture the BN batch statistics of the
        caller's forward (the whole val batch) for the next call (module docstring)."""
        bns = self.batch_stat_bns(model) if self._vjp_based() and self.cfg.bn_stats == "objective" else []
        if not bns:
            yield
            return
        with capture_stats(bns) as stats:
            yield
        self._captured = stats

    def _stats_for(self, model: nn.Module, bns: List[nn.Module], xs: torch.Tensor) -> Stats:
        """The captured statistics if they cover every BN unambiguously, else those of a
        forward of ``xs`` (running statistics left untouched: it is not a training step)."""
        stats, self._captured = self._captured, None
        if stats is not None and all(stats.get(m) is not None for m in bns):
            return {m: stats[m] for m in bns}
        with running_stats_untouched(bns), torch.enable_grad(), capture_stats(bns) as stats:
            model(xs)
        if any(stats.get(m) is None for m in bns):
            raise ValueError("jacobian metric: a BatchNorm runs more than once per forward; per-example "
                             "Jacobians at fixed batch statistics are not defined for this model")
        return stats

    def _batched(self, device: torch.device) -> bool:
        return self.cfg.jacobian.vjp == "batched" or (self.cfg.jacobian.vjp == "auto" and device.type == "cuda")

    def per_example(self, f: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """(1/K) sum_k ||J_k(x_i)||_q (paper) or its squared-l_2 analogue, per example [B]."""
        k = f.shape[1]
        if self.cfg.jacobian.estimator == "paper":
            rows = jacobian_rows(f, x, batched=self._batched(x.device), create_graph=create_graph)
            return torch.linalg.vector_norm(rows.flatten(2), ord=self.q, dim=2).mean(0)
        return frobenius_sq_estimate(f, x, self.cfg.jacobian.projections, create_graph=create_graph,
                                     generator=self.generator) / k

    def _fused(self) -> bool:
        return self.cfg.jacobian.estimator == "frobenius_sq_fd" and self.cfg.jacobian.fd_fused

    def extra_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """frobenius_sq_fd with ``fd_fused``: the perturbed copies of the metric's examples,
        to ride along the caller's forward (the clean rows are the caller's own). None under
        autocast: differencing the caller's reduced-precision logits swamps the difference, so
        the call then runs its own fp32 forward (:func:`frobenius_sq_fd`)."""
        if not self._fused() or torch.is_autocast_enabled(x.device.type):
            return None
        xs = batch_subset(x, y, self.cfg.batch_fraction)[0].detach()
        return fd_inputs(xs, self.cfg.jacobian.projections, self.cfg.jacobian.fd_step, generator=self.generator)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 logits: Optional[torch.Tensor] = None,
                 extra: Optional[torch.Tensor] = None,
                 update: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
        create_graph = torch.is_grad_enabled()
        if self.cfg.jacobian.estimator == "frobenius_sq_fd":
            xs = batch_subset(x, y, self.cfg.batch_fraction)[0].detach()
            if extra is not None and logits is not None and self._fused():
                f_clean = first_logits(logits)[: xs.shape[0]]
                per = fd_frobenius_sq(f_clean, first_logits(extra), self.cfg.jacobian.fd_step) / f_clean.shape[1]
            else:  # a forward of its own: not a training step, so the running statistics stay
                with running_stats_untouched(self.batch_stat_bns(model)):
                    sq, k = frobenius_sq_fd(model, xs, self.cfg.jacobian.projections, self.cfg.jacobian.fd_step,
                                            generator=self.generator)
                per = sq / k
        else:
            bns = self.batch_stat_bns(model)
            reuse = (not bns and logits is not None and create_graph and self.cfg.batch_fraction >= 1.0
                     and x.requires_grad and logits.requires_grad and logits.shape[0] == x.shape[0])
            with torch.enable_grad():
                if reuse:
                    xs, f = x, logits
                else:
                    xs = batch_subset(x, y, self.cfg.batch_fraction)[0].detach()
                    ctx: Any = contextlib.nullcontext()
                    if bns:  # examples differentiated at fixed batch statistics (module docstring)
                        stats = self._stats_for(model, bns, xs)
                        if not create_graph:
                            stats = {m: (a.detach(), b.detach()) for m, (a, b) in stats.items()}
                        ctx = frozen_stats(stats)
                    xs = xs.requires_grad_(True)
                    with ctx:
                        f = first_logits(model(xs))
                per = self.per_example(f, xs, create_graph)
            self._captured = None
        r = -self.cfg.jacobian.delta * per.mean()
        if not create_graph:
            r = r.detach()
        logs = {"R": float(r.detach()), "jacobian_norm": float(per.detach().mean()),
                "examples": float(xs.shape[0])}
        return r, logs
