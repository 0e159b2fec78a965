"""DARTS (Liu et al. 2019): first-order, or second-order with the unrolled weight step.

Second order, as the reference ``Architect._backward_step_unrolled``:

    w'      = w - eta * (momentum * buf + dL_train/dw + wd * w)      (eta: the current lr)
    dalpha  = dL_val(w', alpha)/dalpha - eta * H v,   v = dL_val(w', alpha)/dw'
    H v    ~= (dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha) / (2 r),
               w+- = w +- r v,  r = fd_r / ||v||

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
            # 2) val objective at w': alpha gradient and v
            obj = self.arch_objective(xv, yv, logs)
            grads = self.grads_of(obj, A + W)
            dalpha, v = grads[:len(A)], grads[len(A):]
            all_reduce_mean_(v)
            # 3) finite-difference Hessian-vector product around the current weights
            # the norm in float64: an objective with a huge robustness term (DSRNA-CB's loose
            # bounds reach |R| ~ 1e24 on the full DARTS space) overflows a float32 sum of squares
            v_norm = torch.cat([t.reshape(-1) for t in v]).double().norm().clamp_min(1e-12)
            r = (self.cfg.strategy.fd_r / v_norm).to(v[0].dtype)
            self._set(W, [b + r * t for b, t in zip(backup, v)])
            g_pos = self.grads_of(self.loss(self.model(xt), yt), A)
            self._set(W, [b - r * t for b, t in zip(backup, v)])
            g_neg = self.grads_of(self.loss(self.model(xt), yt), A)
        finally:
            self._set(W, backup)  # exact restore, not w + r v - r v
        final = [da - eta * (gp - gn) / (2 * r) for da, gp, gn in zip(dalpha, g_pos, g_neg)]
        self._apply_arch_grads(final)
        return logs
