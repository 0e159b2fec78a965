"""Shared pieces of the bound engine: intervals, the op-bound base class and its registry.

Design (after auto_LiRPA): every operator of a traced graph gets one *bound class* that knows
three things about it:

* ``forward``  - the clean value (and any per-call state, e.g. the BN statistics in use);
* ``ibp``      - interval bound propagation: input intervals -> output interval;
* ``lin``      - forward-mode linear bounds (see :mod:`.lin`), the cheap pre-pass of CROWN;
* ``backward`` - one step of a CROWN backward pass: given linear coefficients ``lA``/``uA`` of
  shape ``[b, S, *out]`` (S specification rows) for the lower/upper bound of ``spec . out``,
  return the coefficients on each perturbed input plus the bias terms ``[b, S]`` that the
  relaxation of this op adds.

Bound classes are looked up in :data:`BOUND_OPS` by module type (``module:<qualname>``), by
function (``function:<name>``) or by tensor method (``method:<name>``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ..registry import Registry


class BoundError(ValueError):
    """A graph node the engine cannot bound (or bad input); the message names the node/key."""


class Interval:
    """Element-wise bounds ``lower <= value <= upper`` of one perturbed tensor.

    Held in whichever form the op that made it produced -- lower/upper (ReLU, pooling, sums)
    or centre/radius (affine maps) -- and converted lazily, once, when the other form is
    asked for: a chain of affine ops (conv -> BN -> alpha scaling) then never round-trips
    through lower/upper, which matters because the bound engine interprets thousands of
    small ops per call on a DARTS supernet.
    """

    __slots__ = ("_l", "_u", "_m", "_r")

    def __init__(self, lower: Tensor, upper: Tensor) -> None:
        self._l, self._u = lower, upper
        self._m: Optional[Tensor] = None
        self._r: Optional[Tensor] = None

    @staticmethod
    def from_mid_rad(mid: Tensor, rad: Tensor) -> "Interval":
        iv = Interval.__new__(Interval)
        iv._l = iv._u = None
        iv._m, iv._r = mid, rad
        return iv

    @property
    def lower(self) -> Tensor:
        if self._l is None:
            self._l = self._m - self._r
        return self._l

    @property
    def upper(self) -> Tensor:
        if self._u is None:
            self._u = self._m + self._r
        return self._u

    @property
    def mid(self) -> Tensor:
        if self._m is None:
            self._m = torch.lerp(self._l, self._u, 0.5)
        return self._m

    @property
    def rad(self) -> Tensor:
        if self._r is None:
            self._r = (self._u - self._l) * 0.5
        return self._r

    @property
    def centred(self) -> bool:
        """Held as centre/radius only (an affine map's output whose lower/upper nobody asked for)."""
        return self._l is None

    @property
    def ref(self) -> Tensor:
        """A tensor of the bounds' shape, dtype and device, computing nothing."""
        return self._l if self._l is not None else self._m

    def __iter__(self):  # ``lo, up = interval``
        yield self.lower
        yield self.upper

    def slice(self, bs: slice) -> "Interval":
        iv = Interval.__new__(Interval)
        iv._l, iv._u, iv._m, iv._r = (None if t is None else t[bs] for t in (self._l, self._u, self._m, self._r))
        return iv


# Per-arg result of a backward step: (lA, uA) for a perturbed input, None for a constant.
ArgA = Optional[Tuple[Optional[Tensor], Optional[Tensor]]]
Bias = Any  # Tensor [b, S] or 0.0


class BoundOp:
    """Base class: one instance per graph node. ``module`` is set for call_module nodes."""

    #: the op is non-linear and its relaxation needs bounds on its (first) input
    needs_input_bounds: bool = False
    #: the graph nodes among this node's inputs that depend on the perturbed input (engine sets)
    perturbed_inputs: frozenset = frozenset()
    #: the op's bounds need no clean value: in value-free propagation (see BoundedModel) the
    #: engine calls :meth:`prepare` instead of :meth:`forward` and skips the clean pass
    value_free: bool = False
    #: l_2 ball tracking (see BoundedModel): the op is affine and maps an input whose Jacobian
    #: rows (w.r.t. the network input) are mutually orthogonal to an output whose rows are
    #: too -- element-wise scalings and re-indexing. Its :meth:`ibp` on the ball interval is
    #: then exact per element and the rows stay orthogonal.
    keeps_orthogonal_rows: bool = False

    def __init__(self, node: Any, module: Optional[nn.Module] = None) -> None:
        self.node = node
        self.module = module

    @property
    def name(self) -> str:
        return str(self.node.name)

    def forward(self, ctx: Dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def prepare(self, ctx: Dict[str, Any], stats: Any, *args: Any, **kwargs: Any) -> None:
        """Value-free mode: fill ``ctx`` (and check the call) as :meth:`forward` would, from
        stand-in arguments of the right shapes; ``stats`` = BN (mean, var) when captured."""

    def ibp(self, ctx: Dict[str, Any], *args: Any, **kwargs: Any) -> Interval:
        raise NotImplementedError

    def loose_inputs(self, x: Interval) -> Optional[Tensor]:
        """For an op with ``needs_input_bounds``: a bool mask of the input elements whose
        bounds change its relaxation (full CROWN recomputes only those), or None for all."""
        return None

    def ibp_l2(self, ctx: Dict[str, Any], *args: Any, **kwargs: Any) -> Optional[Interval]:
        """Ball interval of a *mixing* affine op (conv, linear) whose perturbed input has
        orthogonal Jacobian rows: ``mid`` is the image of the ball centre and ``rad`` the
        per-element l_2 radius, so ``rad_out = sqrt(|W|^2 rad^2)`` (the dual-norm bound
        ``eps ||W_row D||_2``) instead of IBP's ``|W| rad``. None: the op has no such rule."""
        return None

    def lin(self, ctx: Dict[str, Any], out: Interval, *args: Any, **kwargs: Any) -> Any:
        """Forward-mode linear bounds (:class:`dsrna_dist.bounds.lin.Lin`) of the output, from
        the perturbed arguments' ``Lin`` (their ``.box`` holds the final input box); ``out`` is
        the node's IBP box (its shape). None: no rule, the engine then uses the node's box
        alone (zero weights: sound, only the correlation with the input is lost)."""
        return None

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
def concretize_rows(A: Tensor, sign: float, mid: Tensor, rad: Tensor, norm: str, eps: Tensor,
                    ball_centre: Optional[Tensor] = None) -> Tensor:
    """min (sign -1) or max (sign +1) of the linear rows ``A [B, S, N]`` over the input set: the
    box (``mid``, ``rad``: [B, N]) and, for l_2, also the ball of radius ``eps`` [B] around
    ``ball_centre`` (None: the origin of the coordinates), taking the tighter value (the set lies
    in both). One implementation for CROWN's backward rows and the forward pre-pass's weights."""
    val = torch.einsum("bsn,bn->bs", A, mid) + sign * torch.einsum("bsn,bn->bs", A.abs(), rad)
    if norm == "2":
        ball = sign * eps.view(-1, 1).to(A.dtype) * torch.linalg.vector_norm(A, dim=2)
        if ball_centre is not None:
            ball = ball + torch.einsum("bsn,bn->bs", A, ball_centre)
        val = torch.maximum(val, ball) if sign < 0 else torch.minimum(val, ball)
    return val


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
