"""Shared pieces of the bound engine: intervals, the op-bound base class and its registry.

Design (after auto_LiRPA): every operator of a traced graph gets one *bound class* that knows
three things about it:

* ``forward``  - the clean value (and any per-call state, e.g. the BN statistics in use);
* ``ibp``      - interval bound propagation: input intervals -> output interval;
* ``backward`` - one step of a CROWN backward pass: given linear coefficients ``lA``/``uA`` of
  shape ``[b, S, *out]`` (S specification rows) for the lower/upper bound of ``spec . out``,
  return the coefficients on each perturbed input plus the bias terms ``[b, S]`` that the
  relaxation of this op adds.

Bound classes are looked up in :data:`BOUND_OPS` by module type (``module:<qualname>``), by
function (``function:<name>``) or by tensor method (``method:<name>``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ..registry import Registry


class BoundError(ValueError):
    """A graph node the engine cannot bound (or bad input); the message names the node/key."""


class Interval(NamedTuple):
    """Element-wise bounds ``lower <= value <= upper`` of one perturbed tensor."""
    lower: Tensor
    upper: Tensor

    @property
    def mid(self) -> Tensor:
        return (self.lower + self.upper) / 2

    @property
    def rad(self) -> Tensor:
        return (self.upper - self.lower) / 2

    @staticmethod
    def from_mid_rad(mid: Tensor, rad: Tensor) -> "Interval":
        return Interval(mid - rad, mid + rad)

    def slice(self, bs: slice) -> "Interval":
        return Interval(self.lower[bs], self.upper[bs])


# Per-arg result of a backward step: (lA, uA) for a perturbed input, None for a constant.
ArgA = Optional[Tuple[Optional[Tensor], Optional[Tensor]]]
Bias = Any  # Tensor [b, S] or 0.0


class BoundOp:
    """Base class: one instance per graph node. ``module`` is set for call_module nodes."""

    #: the op is non-linear and its relaxation needs bounds on its (first) input
    needs_input_bounds: bool = False
    #: the graph nodes among this node's inputs that depend on the perturbed input (engine sets)
    perturbed_inputs: frozenset = frozenset()

    def __init__(self, node: Any, module: Optional[nn.Module] = None) -> None:
        self.node = node
        self.module = module

    @property
    def name(self) -> str:
        return str(self.node.name)

    def forward(self, ctx: Dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def ibp(self, ctx: Dict[str, Any], *args: Any, **kwargs: Any) -> Interval:
        raise NotImplementedError

    def backward(self, ctx: Dict[str, Any], lA: Optional[Tensor], uA: Optional[Tensor],
                 *args: Any, **kwargs: Any) -> Tuple[List[Any], Bias, Bias]:
        """Return (per-arg results mirroring ``args``' nesting, lbias, ubias)."""
        raise NotImplementedError(f"{type(self).__name__} has no linear backward")


BOUND_OPS: Registry[Type[BoundOp]] = Registry("bound op")
_FUNCTION_KEYS: Dict[Any, str] = {}


def module_key(cls: type) -> str:
    return f"module:{cls.__module__}.{cls.__qualname__}"


def function_key(fn: Any) -> Optional[str]:
    return _FUNCTION_KEYS.get(fn)


def method_key(name: str) -> str:
    return f"method:{name}"


def register_modules(*classes: type) -> Callable[[Type[BoundOp]], Type[BoundOp]]:
    """Decorator: the bound class handles modules of these exact types."""
    def deco(bound: Type[BoundOp]) -> Type[BoundOp]:
        for c in classes:
            BOUND_OPS.register(module_key(c), bound)
        return bound
    return deco


def register_functions(*fns: Tuple[Any, str]) -> Callable[[Type[BoundOp]], Type[BoundOp]]:
    """Decorator: the bound class handles these ``(function, name)`` call_function targets."""
    def deco(bound: Type[BoundOp]) -> Type[BoundOp]:
        for fn, name in fns:
            key = f"function:{name}"
            _FUNCTION_KEYS[fn] = key
            BOUND_OPS.register(key, bound)
        return bound
    return deco


def register_methods(*names: str) -> Callable[[Type[BoundOp]], Type[BoundOp]]:
    """Decorator: the bound class handles these tensor methods (call_method targets)."""
    def deco(bound: Type[BoundOp]) -> Type[BoundOp]:
        for n in names:
            BOUND_OPS.register(method_key(n), bound)
        return bound
    return deco


def has_module_bound(cls: type) -> bool:
    return module_key(cls) in BOUND_OPS


# ---------------------------------------------------------------------------------- helpers
def sum_spec(t: Tensor) -> Tensor:
    """Sum a ``[b, S, ...]`` tensor over everything but the first two dims -> ``[b, S]``."""
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


def pos(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(min=0)


def neg(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(max=0)


def maybe(fn: Callable[[Tensor], Tensor], t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else fn(t)


def unbroadcast(A: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce coefficients ``[b, S, *out]`` to an input of per-call shape ``shape`` ([B, ...]).

    Undoes broadcasting of the input to the output shape (sums over broadcast dims), so
    ``x * c`` with a broadcast ``x`` gets the right coefficient.
    """
    per = list(shape[1:])
    out_per = list(A.shape[2:])
    extra = len(out_per) - len(per)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    for i, (si, so) in enumerate(zip(per, A.shape[2:])):
        if si == 1 and so != 1:
            A = A.sum(dim=2 + i, keepdim=True)
    return A


def spec_const(c: Tensor, out_dim: int) -> Tensor:
    """A constant broadcastable to a ``[B, ...]`` output, reshaped to broadcast with ``[b, S, ...]``.

    Constants in our graphs carry no batch dimension except a singleton one (they never
    depend on the input); a full-rank constant gets an S axis inserted after its batch axis.
    """
    if c.dim() == out_dim:
        if c.shape[0] != 1:
            raise BoundError("a constant with a batch dimension > 1 enters a perturbed op; "
                             "the engine assumes constants do not depend on the example")
        return c.unsqueeze(1)
    return c


def linear_vjp(fn: Callable[[Tensor], Tensor], A: Tensor, in_shape: Sequence[int]) -> Tensor:
    """Coefficients through a *linear, bias-free* map ``fn``: ``A @ J_fn`` by one autograd VJP.

    Exact for any linear op torch can differentiate (pooling with any divisor rule, adaptive
    pooling, padding modes...). Differentiable in ``A`` when grad mode is on.
    """
    b, S = A.shape[:2]
    per = tuple(in_shape[1:])
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        z = A.new_zeros((b * S,) + per, requires_grad=True)
        out = fn(z)
        (g,) = torch.autograd.grad(out, z, A.reshape((b * S,) + tuple(out.shape[1:])),
                                   create_graph=create, allow_unused=False)
    return g.view((b, S) + per)
