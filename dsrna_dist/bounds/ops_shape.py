"""Bounds of structural and element-wise linear operators.

Identity/reshape/transpose/slicing/concat move coefficients around without changing them;
``+ - * /`` with a constant (a non-perturbed tensor such as ``softmax(alpha)[k]``) are the
alpha/beta-weighted sums of the supernet: the constant stays a differentiable tensor, so the
bounds are differentiable in alpha. The product of two perturbed tensors is refused.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..space.ops import Zero
from .base import (BoundError, BoundOp, Interval, maybe, register_functions, register_methods,
                   register_modules, spec_const, sum_spec, unbroadcast)
from .lin import Lin, add


def _pair(f, lA, uA):
    return (maybe(f, lA), maybe(f, uA))


def _call(node: Any, module: Optional[nn.Module], x: Any, *args: Any, **kwargs: Any) -> Any:
    """Apply the node's own operation (module, function or method) to ``x``."""
    if module is not None:
        return module(x, *args, **kwargs)
    if node.op == "call_method":
        return getattr(x, node.target)(*args, **kwargs)
    return node.target(x, *args, **kwargs)


@register_modules(nn.Identity, nn.Flatten, nn.Dropout, nn.Unflatten)
@register_functions((torch.flatten, "flatten"), (torch.reshape, "reshape"),
                    (torch.squeeze, "squeeze"), (torch.unsqueeze, "unsqueeze"),
                    (torch.unflatten, "unflatten"))
@register_methods("view", "reshape", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
                  "clone", "float")
class BoundReshape(BoundOp):
    """Ops that keep every example's elements in row-major order: coefficients just reshape."""

    keeps_orthogonal_rows = True

    def forward(self, ctx, x: Tensor, *args, **kwargs) -> Tensor:
        if isinstance(self.module, nn.Dropout) and self.module.training and self.module.p > 0:
            raise BoundError(f"node {self.name}: dropout in train mode is random; call model.eval()")
        out = _call(self.node, self.module, x, *args, **kwargs)
        if out.shape[0] != x.shape[0] or out.numel() != x.numel():
            raise BoundError(f"node {self.name} ({self.node.target}): reshapes across the batch "
                             f"dimension ({tuple(x.shape)} -> {tuple(out.shape)})")
        return out

    def ibp(self, ctx, x: Interval, *args, **kwargs) -> Interval:
        return Interval(_call(self.node, self.module, x.lower, *args, **kwargs),
                        _call(self.node, self.module, x.upper, *args, **kwargs))

    def lin(self, ctx, out, x: Lin, *args, **kwargs) -> Lin:
        shape = tuple(out.ref.shape)
        return x.map(lambda w: w.reshape(tuple(w.shape[:2]) + shape[1:]), lambda b: b.reshape(shape))

    def backward(self, ctx, lA, uA, x: Interval, *args, **kwargs):
        shape = tuple(x.lower.shape[1:])
        f = lambda A: A.reshape(tuple(A.shape[:2]) + shape)  # noqa: E731
        return [_pair(f, lA, uA)] + [None] * len(args), 0.0, 0.0


def _norm_dim(d: int, n: int) -> int:
    d = d % n
    if d == 0:
        raise BoundError("an op moves the batch dimension; bounds are per example")
    return d


@register_functions((torch.transpose, "transpose"))
@register_methods("transpose")
class BoundTranspose(BoundOp):
    keeps_orthogonal_rows = True

    def _dims(self, x: Tensor, args, kwargs):
        d0 = kwargs.get("dim0", args[0] if args else None)
        d1 = kwargs.get("dim1", args[1] if len(args) > 1 else None)
        return _norm_dim(d0, x.dim()), _norm_dim(d1, x.dim())

    def forward(self, ctx, x, *args, **kwargs):
        ctx["dims"] = self._dims(x, args, kwargs)
        return x.transpose(*ctx["dims"])

    def ibp(self, ctx, x, *args, **kwargs):
        d = ctx["dims"]
        return Interval(x.lower.transpose(*d), x.upper.transpose(*d))

    def lin(self, ctx, out, x: Lin, *args, **kwargs) -> Lin:
        d0, d1 = ctx["dims"]
        return x.map(lambda w: w.transpose(d0 + 1, d1 + 1), lambda b: b.transpose(d0, d1))

    def backward(self, ctx, lA, uA, x, *args, **kwargs):
        d0, d1 = ctx["dims"]
        return [_pair(lambda A: A.transpose(d0 + 1, d1 + 1), lA, uA)] + [None] * len(args), 0.0, 0.0


@register_functions((torch.permute, "permute"))
@register_methods("permute")
class BoundPermute(BoundOp):
    keeps_orthogonal_rows = True

    def forward(self, ctx, x, *args, **kwargs):
        dims = kwargs.get("dims", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
        dims = [d % x.dim() for d in dims]
        if dims[0] != 0:
            raise BoundError(f"node {self.name}: permute moves the batch dimension")
        ctx["dims"] = dims
        return x.permute(*dims)

    def ibp(self, ctx, x, *args, **kwargs):
        return Interval(x.lower.permute(*ctx["dims"]), x.upper.permute(*ctx["dims"]))

    def lin(self, ctx, out, x: Lin, *args, **kwargs) -> Lin:
        dims = ctx["dims"]
        wperm = [0, 1] + [d + 1 for d in dims[1:]]
        return x.map(lambda w: w.permute(*wperm), lambda b: b.permute(*dims))

    def backward(self, ctx, lA, uA, x, *args, **kwargs):
        dims = ctx["dims"]
        inv = [0] * len(dims)
        for i, d in enumerate(dims):
            inv[d] = i
        perm = [0, 1] + [d + 1 for d in inv[1:]]
        return [_pair(lambda A: A.permute(*perm), lA, uA)] + [None] * len(args), 0.0, 0.0


@register_functions((operator.getitem, "getitem"))
class BoundGetItem(BoundOp):
    """Basic slicing ``x[:, a:b, ::s, ...]``; the batch axis must be kept whole."""

    keeps_orthogonal_rows = True

    @staticmethod
    def _spec_index(idx: Any):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if idx and idx[0] is Ellipsis:
            return idx
        if not idx or idx[0] != slice(None):
            raise BoundError(f"indexing {idx!r} selects along the batch dimension")
        for i in idx:
            if not (isinstance(i, (int, slice)) or i is Ellipsis):
                raise BoundError(f"indexing with {type(i).__name__} is not supported (basic slicing only)")
        return (slice(None), slice(None)) + idx[1:]

    def forward(self, ctx, x, idx):
        ctx["spec_index"] = self._spec_index(idx)
        return x[idx]

    def ibp(self, ctx, x, idx):
        return Interval(x.lower[idx], x.upper[idx])

    def lin(self, ctx, out, x: Lin, idx) -> Lin:
        sidx = ctx["spec_index"]
        return x.map(lambda w: w[sidx], lambda b: b[idx])

    def backward(self, ctx, lA, uA, x, idx):
        shape = tuple(x.lower.shape[1:])
        sidx = ctx["spec_index"]

        def back(A: Tensor) -> Tensor:
            out = A.new_zeros(tuple(A.shape[:2]) + shape)
            out[sidx] = A
            return out

        return [_pair(back, lA, uA), None], 0.0, 0.0


@register_functions((torch.cat, "cat"), (torch.concat, "concat"))
class BoundCat(BoundOp):
    @staticmethod
    def _dim(args, kwargs):
        return kwargs.get("dim", args[0] if args else 0)

    value_free = True

    def forward(self, ctx, tensors, *args, **kwargs):
        out = torch.cat(tensors, *args, **kwargs)
        self.prepare(ctx, None, tensors, *args, **kwargs)
        return out

    def prepare(self, ctx, stats, tensors, *args, **kwargs) -> None:
        ctx["dim"] = _norm_dim(self._dim(args, kwargs), tensors[0].dim())

    def ibp(self, ctx, tensors, *args, **kwargs):
        lo = [t.lower if isinstance(t, Interval) else t for t in tensors]
        hi = [t.upper if isinstance(t, Interval) else t for t in tensors]
        return Interval(torch.cat(lo, ctx["dim"]), torch.cat(hi, ctx["dim"]))

    def lin(self, ctx, out, tensors, *args, **kwargs) -> Lin:
        d = ctx["dim"]
        ref = next(t for t in tensors if isinstance(t, Lin))
        B, D = ref.lw.shape[:2]
        lins = [t if isinstance(t, Lin) else Lin.exact(
            ref.lw.new_zeros((B, D) + tuple(t.shape[1:])), t.expand((B,) + tuple(t.shape[1:])))
            for t in tensors]
        if all(t.is_exact for t in lins):
            return Lin.exact(torch.cat([t.lw for t in lins], d + 1), torch.cat([t.lb for t in lins], d))
        return Lin(torch.cat([t.lw for t in lins], d + 1), torch.cat([t.lb for t in lins], d),
                   torch.cat([t.uw for t in lins], d + 1), torch.cat([t.ub for t in lins], d))

    def backward(self, ctx, lA, uA, tensors, *args, **kwargs):
        sizes = [(t.lower if isinstance(t, Interval) else t).shape[ctx["dim"]] for t in tensors]
        d = ctx["dim"] + 1
        lp = lA.split(sizes, d) if lA is not None else [None] * len(sizes)
        up = uA.split(sizes, d) if uA is not None else [None] * len(sizes)
        res = [(lp[i], up[i]) if isinstance(t, Interval) else None for i, t in enumerate(tensors)]
        return [res] + [None] * len(args), 0.0, 0.0


@register_modules(Zero)
class BoundZero(BoundOp):
    """The ``none`` op (any stride): its output is exactly 0 and passes no coefficient back."""

    def forward(self, ctx, x):
        return self.module(x)

    def ibp(self, ctx, x):
        z = torch.zeros_like(self.module(x.lower))
        return Interval(z, z)

    def lin(self, ctx, out, x: Lin) -> Lin:
        z = torch.zeros_like(out.lower)
        return Lin.const(z, z, x.D)

    def backward(self, ctx, lA, uA, x):
        return [None], 0.0, 0.0


_ARITH = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
          operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
          operator.neg: "neg", torch.neg: "neg", "add": "add", "sub": "sub", "mul": "mul",
          "div": "div", "neg": "neg"}
_APPLY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
          "neg": operator.neg}


@register_functions((operator.add, "operator.add"), (torch.add, "torch.add"),
                    (operator.sub, "operator.sub"), (torch.sub, "torch.sub"),
                    (operator.mul, "operator.mul"), (torch.mul, "torch.mul"),
                    (operator.truediv, "operator.truediv"), (torch.div, "torch.div"),
                    (operator.neg, "operator.neg"), (torch.neg, "torch.neg"))
@register_methods("add", "sub", "mul", "div", "neg")
class BoundArith(BoundOp):
    """``a + b``, ``a - b``, ``a * c``, ``a / c``, ``-a`` with at most one perturbed factor."""

    #: with ONE perturbed input and no broadcasting of it (the engine checks both) these are
    #: element-wise affine maps
    keeps_orthogonal_rows = True

    def __init__(self, node, module=None) -> None:
        super().__init__(node, module)
        self.kind = _ARITH[node.target]

    def _check(self, kwargs):
        if kwargs:
            raise BoundError(f"node {self.name}: keyword arguments {sorted(kwargs)} are not supported")

    value_free = True

    def forward(self, ctx, a, b=None, **kwargs):
        self.prepare(ctx, None, a, b, **kwargs)
        return _APPLY["neg"](a) if self.kind == "neg" else _APPLY[self.kind](a, b)

    def prepare(self, ctx, stats, a, b=None, **kwargs) -> None:
        self._check(kwargs)
        k = self.kind
        if k in ("mul", "div") and isinstance(a, Tensor) and isinstance(b, Tensor) and self._both(ctx):
            raise BoundError(f"node {self.name}: product/quotient of two perturbed tensors is not supported")
        if k == "div" and not self._perturbed_at(0):
            raise BoundError(f"node {self.name}: division by a perturbed tensor is not supported")

    def _perturbed_at(self, i: int) -> bool:
        from torch.fx import Node
        a = self.node.args[i] if i < len(self.node.args) else None
        return isinstance(a, Node) and a in self.perturbed_inputs

    def _both(self, ctx) -> bool:
        return self._perturbed_at(0) and self._perturbed_at(1)

    def ibp(self, ctx, a, b=None, **kwargs):
        k = self.kind
        if k == "neg":
            return Interval(-a.upper, -a.lower)
        ia, ib = isinstance(a, Interval), isinstance(b, Interval)
        if k == "add":
            if ia and ib:
                if a.centred and b.centred:  # both centre/radius (affine outputs): stay so
                    return Interval.from_mid_rad(a.mid + b.mid, a.rad + b.rad)
                return Interval(a.lower + b.lower, a.upper + b.upper)
            x, c = (a, b) if ia else (b, a)
            return Interval(x.lower + c, x.upper + c)
        if k == "sub":
            if ia and ib:
                return Interval(a.lower - b.upper, a.upper - b.lower)
            if ia:
                return Interval(a.lower - b, a.upper - b)
            return Interval(a - b.upper, a - b.lower)
        if k == "mul":
            x, c = (a, b) if ia else (b, a)
            c_abs = c.abs() if isinstance(c, Tensor) else abs(c)
            return Interval.from_mid_rad(x.mid * c, x.rad * c_abs)
        c_abs = b.abs() if isinstance(b, Tensor) else abs(b)
        return Interval.from_mid_rad(a.mid / b, a.rad / c_abs)

    def lin(self, ctx, out, a, b=None, **kwargs) -> Optional[Lin]:
        """Exact for these affine ops; None (the engine's box fallback) where the perturbed
        input is broadcast to a larger shape or a constant carries a batch axis > 1."""
        k = self.kind
        if k == "neg":
            return a.neg()
        la, lb_ = isinstance(a, Lin), isinstance(b, Lin)
        if any(isinstance(t, Lin) and tuple(t.lb.shape) != tuple(out.ref.shape) for t in (a, b)):
            return None
        c = b if la else a
        if isinstance(c, Tensor) and c.dim() == out.ref.dim() and c.shape[0] != 1:
            return None
        if k in ("add", "sub"):
            sign = 1.0 if k == "add" else -1.0
            if la and lb_:
                return add(a, b, sign)
            if la:
                return a.shift(sign * b)
            return (b if sign > 0 else b.neg()).shift(a)
        if k == "mul":
            return (a if la else b).scale(c)
        return a.scale(1.0 / b)

    def backward(self, ctx, lA, uA, a, b=None, **kwargs):
        k = self.kind

        def shape(t):
            return t.lower.shape

        if k == "neg":
            return [_pair(lambda A: -A, lA, uA)], 0.0, 0.0
        ia, ib = isinstance(a, Interval), isinstance(b, Interval)
        out_dim = (lA if lA is not None else uA).dim() - 1

        def const(c):
            return spec_const(c, out_dim) if isinstance(c, Tensor) else c

        def bias(c, sign=1.0):  # the constant's contribution spec . (sign * c)
            cc = const(c)
            f = lambda A: sign * sum_spec(A * cc)  # noqa: E731
            return (f(lA) if lA is not None else 0.0), (f(uA) if uA is not None else 0.0)

        if k in ("add", "sub"):
            sb = 1.0 if k == "add" else -1.0
            if ia and ib:
                return [_pair(lambda A: unbroadcast(A, shape(a)), lA, uA),
                        _pair(lambda A: sb * unbroadcast(A, shape(b)), lA, uA)], 0.0, 0.0
            if ia:
                lb, ub = bias(b, sb)
                return [_pair(lambda A: unbroadcast(A, shape(a)), lA, uA), None], lb, ub
            lb, ub = bias(a, 1.0)
            return [None, _pair(lambda A: sb * unbroadcast(A, shape(b)), lA, uA)], lb, ub
        if k == "mul":
            if ia:
                c = const(b)
                return [_pair(lambda A: unbroadcast(A * c, shape(a)), lA, uA), None], 0.0, 0.0
            c = const(a)
            return [None, _pair(lambda A: unbroadcast(A * c, shape(b)), lA, uA)], 0.0, 0.0
        c = const(b)
        return [_pair(lambda A: unbroadcast(A / c, shape(a)), lA, uA), None], 0.0, 0.0
