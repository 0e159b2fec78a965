"""Forward-mode linear bounds (CROWN-forward / symbolic intervals): the cheap pre-pass of full CROWN.

Every perturbed node ``v`` gets, per example, two linear functions of the input perturbation

    lw . (x' - x0) + lb  <=  v(x')  <=  uw . (x' - x0) + ub      for every x' in the input set,

with weights ``[B, D, *shape]`` (D = input numel: the perturbation dimension is a batch
dimension of the weight tensors) and biases ``[B, *shape]``. They are propagated node by node
in topological order by each bound class's ``lin`` method: linear ops map them exactly
(signed weights through the centre/radius split ``W m -/+ |W| r``, which is the W+/W- split
written with two products instead of four), ReLU and max pool use a relaxation chosen on the
node's input *box*. The cost scales with D, not with the number of neurons, which is why it
pays on a DARTS net where IBP leaves tens of thousands of neurons loose: the boxes it yields
(concretized, intersected with IBP) settle most of them before any backward pass runs.

Why relative to ``x0``: the bias is then the bound at the clean input and the weights only carry
the perturbation, so float32 rounding does not cancel large terms at small eps.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .base import Interval, concretize_rows

Fn = Callable[[Tensor], Tensor]


class Lin:
    """Lower/upper linear bounds of one node (see the module docstring). ``lw is uw`` and
    ``lb is ub`` when the bounds are exact (an affine function of the input: the prefix up to
    the first relaxation), which halves the work of every linear op on them."""

    __slots__ = ("lw", "lb", "uw", "ub", "box")

    def __init__(self, lw: Tensor, lb: Tensor, uw: Tensor, ub: Tensor) -> None:
        self.lw, self.lb, self.uw, self.ub = lw, lb, uw, ub
        #: the node's final box (IBP ∩ this ∩ CROWN), set by the engine: the relaxations read it
        self.box: Optional[Interval] = None

    @staticmethod
    def exact(w: Tensor, b: Tensor) -> "Lin":
        return Lin(w, b, w, b)

    @staticmethod
    def const(lo: Tensor, up: Tensor, D: int) -> "Lin":
        """A node known only by its box: zero weights (sound, no correlation kept)."""
        w = lo.new_zeros((lo.shape[0], D) + tuple(lo.shape[1:]))
        return Lin(w, lo, w, up)

    @staticmethod
    def identity(x: Tensor) -> "Lin":
        """The input itself: weights e_d, bias x0 (so lw . (x' - x0) + lb = x')."""
        B = x.shape[0]
        D = x[0].numel()
        eye = torch.eye(D, dtype=x.dtype, device=x.device).view((1, D) + tuple(x.shape[1:]))
        return Lin.exact(eye.expand((B, D) + tuple(x.shape[1:])), x)

    @property
    def is_exact(self) -> bool:
        return self.lw is self.uw and self.lb is self.ub

    @property
    def D(self) -> int:
        return self.lw.shape[1]

    def mid_rad(self) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(mw, mb, rw, rb): centre and half-difference functions (rw/rb None when exact)."""
        if self.is_exact:
            return self.lw, self.lb, None, None
        return ((self.lw + self.uw) * 0.5, (self.lb + self.ub) * 0.5,
                (self.uw - self.lw) * 0.5, (self.ub - self.lb) * 0.5)

    @staticmethod
    def from_mid_rad(mw: Tensor, mb: Tensor, rw: Optional[Tensor], rb: Optional[Tensor]) -> "Lin":
        if rw is None:
            return Lin.exact(mw, mb)
        return Lin(mw - rw, mb - rb, mw + rw, mb + rb)

    def map(self, fw: Fn, fb: Fn) -> "Lin":
        """The same linear-and-monotone map on both bounds (reshape, slicing, average pooling):
        ``fw`` acts on weights [B, D, ...], ``fb`` on biases [B, ...]."""
        if self.is_exact:
            return Lin.exact(fw(self.lw), fb(self.lb))
        return Lin(fw(self.lw), fb(self.lb), fw(self.uw), fb(self.ub))

    def neg(self) -> "Lin":
        return Lin(-self.uw, -self.ub, -self.lw, -self.lb)

    def shift(self, t) -> "Lin":
        """``v + t`` for a constant ``t`` (broadcast against the [B, ...] biases)."""
        if self.is_exact:
            b = self.lb + t
            return Lin.exact(self.lw, b)
        return Lin(self.lw, self.lb + t, self.uw, self.ub + t)

    def scale(self, s, t=None) -> "Lin":
        """Element-wise ``s * v + t`` for a constant ``s`` of any sign (broadcast from the right
        over [B, D, ...] weights and [B, ...] biases; a per-example constant [1, ...] must be
        given with its batch axis removed or as a scalar)."""
        mw, mb, rw, rb = self.mid_rad()
        nb = mb * s if t is None else mb * s + t
        if rw is None:
            return Lin.exact(mw * s, nb)
        sa = s.abs() if isinstance(s, Tensor) else abs(s)
        return Lin.from_mid_rad(mw * s, nb, rw * sa, rb * sa)


def flat_apply(fn: Fn, w: Tensor) -> Tensor:
    """Apply a per-example map ``fn`` ([N, ...] -> [N, ...]) to weights [B, D, ...] by folding
    D into the batch axis."""
    B, D = w.shape[:2]
    out = fn(w.reshape((B * D,) + tuple(w.shape[2:])))
    return out.view((B, D) + tuple(out.shape[1:]))


def affine(lin: Lin, fw: Fn, fabs: Fn, fb: Fn, fb_abs: Fn) -> Lin:
    """Bounds through a signed linear map ``W`` (+ bias): ``W m -/+ |W| r``. ``fw``/``fabs``:
    ``W`` / ``|W|`` on weights [B, D, ...] (no bias); ``fb``: ``W`` plus the bias on biases
    [B, ...]; ``fb_abs``: ``|W|`` on biases, no bias."""
    mw, mb, rw, rb = lin.mid_rad()
    return Lin.from_mid_rad(fw(mw), fb(mb), None if rw is None else fabs(rw), None if rb is None else fb_abs(rb))


def add(a: Lin, b: Lin, sign: float = 1.0) -> Lin:
    """``a + b`` (``sign`` -1: ``a - b``, lower = la - ub)."""
    if sign < 0:
        b = b.neg()
    if a.is_exact and b.is_exact:
        return Lin.exact(a.lw + b.lw, a.lb + b.lb)
    return Lin(a.lw + b.lw, a.lb + b.lb, a.uw + b.uw, a.ub + b.ub)


def concretize(lin: Lin, x0: Tensor, box: Interval, eps: Tensor, norm: str) -> Interval:
    """Box of ``lin`` over the input set ``{||x' - x0||_p <= eps} ∩ box`` (``box`` = the input
    box, i.e. the l_inf ball clipped to the valid range, or the l_2 ball's box hull).

    Over the box: ``lb + lw.(mid - x0) - |lw|.rad``; for l_2 also the ball value
    ``lb - eps ||lw||_2``, and the tighter of the two (the set lies in both)."""
    B, D = lin.lw.shape[:2]
    shape = lin.lb.shape
    d = (box.mid - x0).reshape(B, D)  # coordinates relative to x0: the ball's centre is the origin
    rad = box.rad.reshape(B, D)

    def one(w: Tensor, b: Tensor, sign: float) -> Tensor:
        rows = w.reshape(B, D, -1).transpose(1, 2)  # [B, N, D]: one row per output neuron
        return (b.reshape(B, -1) + concretize_rows(rows, sign, d, rad, norm, eps)).view(shape)

    lo = one(lin.lw, lin.lb, -1.0)
    up = one(lin.uw, lin.ub, 1.0)
    return Interval(lo, up)


def dual_norms(lin: Lin, norm: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[cl, nl, cu, nu]`` flat [B, N]: the bounds as functions of eps over the plain ball,
    ``lower(e) = cl - e nl``, ``upper(e) = cu + e nu`` (the format of ``_Run.lin``)."""
    B, D = lin.lw.shape[:2]
    p = 1 if norm == "inf" else 2
    nl = torch.linalg.vector_norm(lin.lw.reshape(B, D, -1), ord=p, dim=1)
    nu = torch.linalg.vector_norm(lin.uw.reshape(B, D, -1), ord=p, dim=1) if lin.uw is not lin.lw else nl.clone()
    # fresh tensors: the caller writes into them (never into a Lin's bias or a shared norm)
    return lin.lb.reshape(B, -1).clone(), nl, lin.ub.reshape(B, -1).clone(), nu
