"""Bound of the alpha-weighted sum of branches, the one operator that makes a DARTS supernet.

``weighted_sum(weights, index, branches) = sum_i weights[index[i]] * branches[i]`` is a single
traced call (``torch.fx.wrap`` in :mod:`dsrna_dist.space.cells`), so an edge with 7 candidate
ops is one bound op instead of 7 products and 6 sums: the engine interprets ~2400 small ops per
pass on a supernet, and this is a quarter of them. The weights (softmax(alpha), PC-DARTS betas)
are non-perturbed tensors that stay in the autograd graph, so bounds remain differentiable in
alpha and beta.

IBP in centre/radius form: mid = sum_i w_i mid_i, rad = sum_i |w_i| rad_i (exact for a box).
Backward: every branch gets ``w_i * A`` (one broadcast product for all branches), no bias.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from ..space.cells import weighted_sum
from .base import BoundError, BoundOp, Interval, register_functions, spec_const, sum_spec, unbroadcast
from .lin import Lin, add


@register_functions((weighted_sum, "weighted_sum"))
class BoundWeightedSum(BoundOp):
    value_free = True

    def forward(self, ctx, weights: Tensor, index: Sequence[int], branches: List[Tensor]) -> Tensor:
        return weighted_sum(weights, index, branches)

    def prepare(self, ctx, stats, weights, index, branches) -> None:
        if isinstance(weights, Interval):
            raise BoundError(f"node {self.name}: the branch weights depend on the input")

    def ibp(self, ctx, weights: Tensor, index: Sequence[int], branches: List[object]) -> Interval:
        w = weights[list(index)]
        shape = next(b.ref.shape for b in branches if isinstance(b, Interval))
        mids = torch.stack([b.mid if isinstance(b, Interval) else b.expand(shape) for b in branches])
        rads = torch.stack([b.rad if isinstance(b, Interval) else b.new_zeros(()).expand(shape)
                            for b in branches])
        return Interval.from_mid_rad(torch.tensordot(w, mids, 1), torch.tensordot(w.abs(), rads, 1))

    def lin(self, ctx, out, weights: Tensor, index: Sequence[int], branches: List[object]):
        w = weights[list(index)]
        shape = tuple(out.ref.shape)
        acc = None
        const = 0.0
        for wi, b in zip(w, branches):
            if isinstance(b, Lin):
                if tuple(b.lb.shape) != shape:
                    return None  # a broadcast branch: the engine's box fallback
                t = b.scale(wi)
                acc = t if acc is None else add(acc, t)
            else:
                const = const + wi * b
        return acc.shift(const)

    def backward(self, ctx, lA, uA, weights: Tensor, index: Sequence[int], branches: List[object]):
        w = weights[list(index)]
        view = (-1,) + (1,) * (lA if lA is not None else uA).dim()

        def split(A):
            if A is None:
                return [None] * len(branches)
            return list((A.unsqueeze(0) * w.view(view)).unbind(0))

        ls, us = split(lA), split(uA)
        res: list = []
        lb: object = 0.0
        ub: object = 0.0
        out_dim = (lA if lA is not None else uA).dim() - 1
        for b, la, ua in zip(branches, ls, us):
            if isinstance(b, Interval):
                shape = b.ref.shape
                res.append((None if la is None else unbroadcast(la, shape),
                            None if ua is None else unbroadcast(ua, shape)))
                continue
            res.append(None)  # a constant branch: its (weighted) value is a bias
            c = spec_const(b, out_dim)
            if la is not None:
                lb = lb + sum_spec(la * c)
            if ua is not None:
                ub = ub + sum_spec(ua * c)
        return [None, None, res], lb, ub
