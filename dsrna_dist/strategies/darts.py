"""DARTS (Liu et al. 2019): first-order, or second-order with the unrolled weight step.

Second order, as the reference ``Architect._backward_step_unrolled``:

    w'      = w - eta * (momentum * buf + dL_train/dw + wd * w)      (eta: the current lr)
    dalpha  = dL_val(w', alpha)/dalpha - eta * H v,   v = dL_val(w', alpha)/dw'
    H v    ~= (dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha) / (2 r),
               w+- = w +- r v,  r = fd_r / ||v||

With a robustness metric the val objective has two terms, L_val and R: each gets its own v and
its own Hessian-vector product (H is linear in v, but r = fd_r / ||v|| differs per term), so
the unrolled gradients of L and of R come out separately and are combined by
``SearchStrategy.combine_arch_grads`` (gamma, or a fixed share of the arch gradient).

Distributed: the train gradient and v are mean-reduced over ranks (so w', w+- are the same on
every rank, as with one global batch) and the final alpha gradient is mean-reduced; the
weights are swapped in place and restored from an exact copy, never through DDP.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..engine.sync import all_reduce_mean_
from .base import STRATEGIES, SearchStrategy


@STRATEGIES.register("darts")
class DARTS(SearchStrategy):
    name = "darts"

    def arch_step(self, xt, yt, xv, yv, *, epoch: int, step: int, lr: float) -> Dict[str, float]:
        if self.cfg.strategy.order == 1:
            return super().arch_step(xt, yt, xv, yv, epoch=epoch, step=step, lr=lr)
        return self._unrolled_step(xt, yt, xv, yv, lr)

    @torch.no_grad()
    def _set(self, params: List[torch.Tensor], values: List[torch.Tensor]) -> None:
        for p, v in zip(params, values):
            p.copy_(v)

    def _hessian_vector(self, W: List[torch.Tensor], backup: List[torch.Tensor], v: List[torch.Tensor],
                        xt: torch.Tensor, yt: torch.Tensor) -> List[torch.Tensor]:
        """(d^2 L_train / d alpha d w) v by central differences at w +- r v, r = fd_r / ||v||
        (leaves the weights at w - r v: the caller restores them)."""
        A = self.arch_params
        # the norm in float64: an objective with a huge robustness term (DSRNA-CB's loose
        # bounds reach |R| ~ 1e24 on the full DARTS space) overflows a float32 sum of squares
        v_norm = torch.cat([t.reshape(-1) for t in v]).double().norm().clamp_min(1e-12)
        r = (self.cfg.strategy.fd_r / v_norm).to(v[0].dtype)
        self._set(W, [b + r * t for b, t in zip(backup, v)])
        g_pos = self.grads_of(self.loss(self.model(xt), yt), A)
        self._set(W, [b - r * t for b, t in zip(backup, v)])
        g_neg = self.grads_of(self.loss(self.model(xt), yt), A)
        return [(gp - gn) / (2 * r) for gp, gn in zip(g_pos, g_neg)]

    def _unrolled_step(self, xt, yt, xv, yv, eta: float) -> Dict[str, float]:
        W, A = self.weight_params, self.arch_params
        opt = self.ctx.w_optim
        group = opt.param_groups[0]
        momentum, wd = group.get("momentum", 0.0), group.get("weight_decay", 0.0)
        logs: Dict[str, float] = {}

        # 1) virtual SGD step w -> w'
        g_train = self.grads_of(self.loss(self.model(xt), yt), W)
        all_reduce_mean_(g_train)
        backup = [w.detach().clone() for w in W]
        with torch.no_grad():
            for w, g in zip(W, g_train):
                d = g + wd * w
                buf = opt.state.get(w, {}).get("momentum_buffer")
                if buf is not None and momentum:
                    d = d + momentum * buf
                w.sub_(eta * d)

        try:
            # 2) val loss and R at w': alpha gradients and v (the weight gradients), per term
            loss, r = self.arch_terms(xv, yv, logs)
            terms = [loss] if r is None else [loss, r]
            parts = []
            for i, t in enumerate(terms):
                grads = self.grads_of(t, A + W, retain_graph=i + 1 < len(terms))
                parts.append((grads[:len(A)], grads[len(A):]))
            all_reduce_mean_([t for _, v in parts for t in v])
            # 3) per term, the finite-difference Hessian-vector product around the current weights
            unrolled = [[da - eta * h for da, h in zip(dalpha, self._hessian_vector(W, backup, v, xt, yt))]
                        for dalpha, v in parts]
        finally:
            self._set(W, backup)  # exact restore, not w + r v - r v
        if r is None:
            self._apply_arch_grads(unrolled[0])
        else:  # the unrolled gradients of L and of R, combined as the trade-off says
            self._apply_arch_grads(self.combine_arch_grads(unrolled[0], unrolled[1], logs), reduced=True)
        return logs
