"""Bounds of the non-linear operators: ReLU and max pooling.

ReLU (CROWN, Zhang et al. 2018): for an unstable neuron (l < 0 < u) the upper line is the
chord ``u (x - l) / (u - l)``; the lower line is ``a x`` with ``a = 1 if u > -l else 0``
("adaptive", CROWN's default) or ``a = 0`` ("zero": every term then concretizes exactly like
IBP, which is what makes CROWN-IBP provably no looser than IBP through one ReLU layer).

Max pool, two relaxations (``BoundedModel(max_pool=...)``), both sound for any kernel, stride,
padding and dilation since they hold window by window:

* "cheap": lower ``y >= x_i*`` with ``i*`` the input of the window with the largest lower bound;
  upper ``y <= max_i u_i`` (a constant).
* "cnn-cert" (Boopathy et al. 2019): over the candidates ``S = {i : u_i >= max_j l_j}`` (the
  only inputs that can be the max), weights ``w_i = (u_i - g) / (u_i - l_i)`` with ``g`` solving
  ``sum_S w_i = 1``, clamped to ``[max_S l, min_S u]``; upper ``y <= sum w_i (x_i - l_i) + g``
  (at ``x_k = u_k`` it is ``>= u_k``, at ``x_k = l_k`` it is ``>= g >= l_k``, linear between,
  and the other terms are >= 0); lower ``y >= sum w_i x_i + b`` with ``b = min_S l (1 - sum w)``
  when ``sum w <= 1`` else ``max_S u (1 - sum w)``. A candidate with ``l_i = u_i`` gets weight 0
  (then ``g = l_i``). Neither relaxation dominates the other: "best" (the default) bounds the
  final specification with both and keeps the tighter, intermediate bounds use "cheap".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (BoundError, BoundOp, Interval, neg, pos, register_functions, register_methods,
                   register_modules, sum_spec)
from .lin import Lin

RELU_LOWER = ("adaptive", "zero")
MAX_POOL = ("cheap", "cnn-cert", "best")


@register_modules(nn.ReLU)
@register_functions((F.relu, "relu"), (torch.relu, "torch.relu"))
@register_methods("relu")
class BoundReLU(BoundOp):
    needs_input_bounds = True
    value_free = True
    lower_mode: str = "adaptive"  # set per BoundedModel

    def forward(self, ctx, x: Tensor, *args, **kwargs) -> Tensor:
        return F.relu(x)  # never in place: the engine keeps the clean input of every node

    def ibp(self, ctx, x: Interval, *args, **kwargs) -> Interval:
        return Interval(F.relu(x.lower), F.relu(x.upper))

    def loose_inputs(self, x: Interval) -> Tensor:
        """Unstable neurons: a stable one is relaxed exactly whatever its bounds."""
        return (x.lower < 0) & (x.upper > 0)

    def relaxation(self, x: Interval):
        """(lower slope, upper slope, upper intercept), each [b, 1, ...], in closed form.

        su = (relu(u) - relu(l)) / (u - l) is 1 / 0 / the chord slope for active / inactive /
        unstable neurons and bu = relu(u) - su * u the chord's intercept (0 when stable); the
        adaptive lower slope 1[u + l > 0] is 1 / 0 / CROWN's choice. A neuron with l = u gets
        the constant line su = 0, bu = relu(u), exact on its single point. Fewer ops than
        masks + where, which counts: a DARTS supernet has hundreds of ReLUs per bound call.
        """
        l, u = x.lower, x.upper
        ru = F.relu(u)
        su = (ru - F.relu(l)) / (u - l).clamp(min=1e-12)
        bu = ru - su * u
        sl = ((u + l) > 0) if self.lower_mode == "adaptive" else (l >= 0)
        return sl.to(l.dtype).unsqueeze(1), su.unsqueeze(1), bu.unsqueeze(1)

    def lin(self, ctx, out, x: Lin, *args, **kwargs) -> Lin:
        """The backward pass's lines on the forward bounds: both slopes are >= 0, so the
        lower line takes the lower bound and the upper line the upper bound."""
        sl, su, bu = self.relaxation(x.box)
        return Lin(x.lw * sl, x.lb * sl.squeeze(1), x.uw * su, x.ub * su.squeeze(1) + bu.squeeze(1))

    def backward(self, ctx, lA: Optional[Tensor], uA: Optional[Tensor], x: Interval, *args, **kwargs):
        sl, su, bu = self.relaxation(x)
        new_l = new_u = None
        lb = ub = 0.0
        if lA is not None:  # positive coefficients take the lower line, negative the upper
            new_l = torch.where(lA >= 0, sl, su) * lA
            lb = sum_spec(lA.clamp(max=0) * bu)
        if uA is not None:
            new_u = torch.where(uA >= 0, su, sl) * uA
            ub = sum_spec(uA.clamp(min=0) * bu)
        return [(new_l, new_u)] + [None] * len(args), lb, ub


@register_modules(nn.MaxPool2d)
class BoundMaxPool2d(BoundOp):
    needs_input_bounds = True
    value_free = True

    def _pool(self, x: Tensor, indices: bool = False):
        m: nn.MaxPool2d = self.module  # type: ignore[assignment]
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                            return_indices=indices)

    def forward(self, ctx, x: Tensor) -> Tensor:
        self.prepare(ctx, None, x)
        return self._pool(x)

    def prepare(self, ctx, stats, x: Tensor) -> None:
        if self.module.return_indices:
            raise BoundError(f"node {self.name}: MaxPool2d(return_indices=True) is not supported")

    def ibp(self, ctx, x: Interval) -> Interval:
        return Interval(self._pool(x.lower), self._pool(x.upper))

    def loose_inputs(self, x: Interval) -> Tensor:
        """The candidates of every window (``u_i >= max_j l_j``): the others can never be the
        max, and tighter bounds on them change neither relaxation."""
        if self.module.ceil_mode:
            return torch.ones_like(x.lower, dtype=torch.bool)
        _, _, _, cand, (k, s, p, d) = self._windows(x)
        b, C, H, W = x.lower.shape
        hit = F.fold(cand.to(x.lower.dtype).view(b, C * k[0] * k[1], -1), (H + 2 * p[0], W + 2 * p[1]), k, d, 0, s)
        return hit[..., p[0]:p[0] + H, p[1]:p[1] + W] > 0

    #: the relaxation of the current backward pass ("cheap" or "cnn-cert"; the engine sets it)
    relaxation: str = "cheap"

    def _windows(self, x: Interval):
        """The pooling windows of the bounds, unfolded: lower and upper ``[b, C, k*k, L]``, the
        largest lower bound per window and the candidates (``u_i >= max_j l_j``, and the
        best-lower input even if rounding left u < l), with (kernel, stride, padding, dilation).
        Max pooling pads with -inf; a finite value below every lower bound is never a candidate
        either and keeps inf/nan out of the autograd graph."""
        m: nn.MaxPool2d = self.module  # type: ignore[assignment]
        k = nn.modules.utils._pair(m.kernel_size)
        s = nn.modules.utils._pair(m.stride if m.stride is not None else m.kernel_size)
        p = nn.modules.utils._pair(m.padding)
        d = nn.modules.utils._pair(m.dilation)
        b, C = x.lower.shape[:2]
        floor = float(x.lower.min().detach()) - 1.0

        def unfold(t: Tensor) -> Tensor:
            t = F.pad(t, (p[1], p[1], p[0], p[0]), value=floor)
            return F.unfold(t, k, d, 0, s).view(b, C, k[0] * k[1], -1)

        lo, up = unfold(x.lower), unfold(x.upper)
        max_l = lo.max(2, keepdim=True).values
        return lo, up, max_l, (up >= max_l) | (lo == max_l), (k, s, p, d)

    def _cnn_cert_lines(self, x: Interval):
        """Per window: weights [b, C, k*k, L] and the lower/upper intercepts [b, C, L]."""
        lo, up, max_l, cand, (k, s, p, d) = self._windows(x)
        width = up - lo
        free = cand & (width > 0)
        safe_w = torch.where(free, width, torch.ones_like(width))
        zero = torch.zeros_like(lo)
        inv = torch.where(free, 1.0 / safe_w, zero)
        g = (torch.where(free, up * inv, zero).sum(2, keepdim=True) - 1.0) / inv.sum(2, keepdim=True).clamp(min=1e-30)
        min_u = torch.where(cand, up, torch.full_like(up, float('inf'))).min(2, keepdim=True).values
        g = torch.maximum(torch.minimum(g, min_u), max_l)
        w = torch.where(free, (up - g) * inv, zero).clamp(min=0)
        growth = w.sum(2)
        min_l = torch.where(cand, lo, torch.full_like(lo, float('inf'))).min(2).values
        max_u = torch.where(cand, up, torch.full_like(up, float('-inf'))).max(2).values
        bu = g.squeeze(2) - torch.where(free, w * lo, zero).sum(2)
        bl = torch.where(growth <= 1, min_l, max_u) * (1 - growth)
        return w, bl, bu, (k, s, p, d)

    def _backward_cnn_cert(self, ctx, lA, uA, x: Interval):
        w, bl, bu, (k, s, p, d) = self._cnn_cert_lines(x)
        in_shape = x.lower.shape
        H, W = in_shape[2] + 2 * p[0], in_shape[3] + 2 * p[1]
        out_hw = (lA if lA is not None else uA).shape[-2:]
        bl, bu = bl.view((bl.shape[0], 1, bl.shape[1]) + tuple(out_hw)), bu.view((bu.shape[0], 1, bu.shape[1]) + tuple(out_hw))

        def back(A: Tensor) -> Tensor:  # both lines share the weights: coefficient A * w, folded
            b, S, C = A.shape[:3]
            cols = (A.flatten(3).unsqueeze(3) * w.unsqueeze(1)).reshape(b * S, C * w.shape[2], -1)
            out = F.fold(cols, (H, W), k, d, 0, s)
            return out[..., p[0]:p[0] + in_shape[2], p[1]:p[1] + in_shape[3]].reshape((b, S) + tuple(in_shape[1:]))

        new_l = new_u = None
        lb = ub = 0.0
        if lA is not None:
            new_l = back(lA)
            lb = sum_spec(pos(lA) * bl + neg(lA) * bu)
        if uA is not None:
            new_u = back(uA)
            ub = sum_spec(pos(uA) * bu + neg(uA) * bl)
        return [(new_l, new_u)], lb, ub

    def lin(self, ctx, out, x: Lin) -> Lin:
        """Lower: the input with the largest lower bound (``y >= x_i*``); upper: the constant
        ``max_i u_i``, or ``x_i*``'s own upper bound where ``i*`` is the window's only
        candidate (then ``y = x_i*`` on the whole set)."""
        box = x.box
        _, idx = self._pool(box.lower, indices=True)  # [B, C, Ho, Wo] flat H*W index
        upper = self._pool(box.upper)
        B, D, C = x.lw.shape[:3]
        oshape = tuple(idx.shape[1:])
        ib = idx.flatten(2)
        iw = ib.unsqueeze(1).expand(B, D, C, ib.shape[-1])

        def gw(w: Tensor) -> Tensor:
            return w.flatten(3).gather(3, iw).view((B, D) + oshape)

        def gb(b: Tensor) -> Tensor:
            return b.flatten(2).gather(2, ib).view((B,) + oshape)

        lw, lb = gw(x.lw), gb(x.lb)
        if self.module.ceil_mode:
            return Lin(lw, lb, torch.zeros_like(lw), upper)
        cand = self._windows(box)[3]
        single = (cand.sum(2) == 1).view((B,) + oshape)
        uw = gw(x.uw) * single.unsqueeze(1).to(lw.dtype)
        ub = torch.where(single, gb(x.ub), upper)
        return Lin(lw, lb, uw, ub)

    def backward(self, ctx, lA, uA, x: Interval):
        if self.relaxation == "cnn-cert" and not self.module.ceil_mode:
            return self._backward_cnn_cert(ctx, lA, uA, x)
        _, idx = self._pool(x.lower, indices=True)  # flat H*W index of the best-lower input
        upper = self._pool(x.upper).unsqueeze(1)
        in_shape = x.lower.shape

        def select(A: Tensor) -> Tensor:  # coefficient of x_{i*}: scatter back into the input
            b, S, C = A.shape[:3]
            out = A.new_zeros((b, S, C, in_shape[2] * in_shape[3]))
            index = idx.unsqueeze(1).expand(b, S, C, -1, -1).flatten(3)
            return out.scatter_add(3, index, A.flatten(3)).view((b, S) + tuple(in_shape[1:]))

        new_l = new_u = None
        lb = ub = 0.0
        if lA is not None:
            new_l = select(pos(lA))
            lb = sum_spec(neg(lA) * upper)
        if uA is not None:
            new_u = select(neg(uA))
            ub = sum_spec(pos(uA) * upper)
        return [(new_l, new_u)], lb, ub
