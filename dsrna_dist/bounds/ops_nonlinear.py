"""Bounds of the non-linear operators: ReLU and max pooling.

ReLU (CROWN, Zhang et al. 2018): for an unstable neuron (l < 0 < u) the upper line is the
chord ``u (x - l) / (u - l)``; the lower line is ``a x`` with ``a = 1 if u > -l else 0``
("adaptive", CROWN's default) or ``a = 0`` ("zero": every term then concretizes exactly like
IBP, which is what makes CROWN-IBP provably no looser than IBP through one ReLU layer).

Max pool: the cheap valid relaxation. Lower: ``y >= x_i*`` with ``i*`` the input of the window
with the largest lower bound; upper: ``y <= max_i u_i`` (a constant). Both are sound for any
kernel/stride/padding/dilation (stride != kernel included) since they hold window by window.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (BoundError, BoundOp, Interval, neg, pos, register_functions, register_methods,
                   register_modules, sum_spec)

RELU_LOWER = ("adaptive", "zero")


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

    def backward(self, ctx, lA, uA, x: Interval):
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
