"""Bounds of the affine operators: conv, linear, BN, Normalize, pooling averages.

For an affine map ``y = W x + b`` IBP uses the centre/radius form (``W mid + b``, ``|W| rad``),
which is exact per output for a box; the backward step is ``A -> A W`` with bias ``A b``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..space.layers import Normalize, SubsampledConv2d
from .base import (BoundError, BoundOp, Interval, linear_vjp, maybe, register_functions,
                   register_methods, register_modules, sum_spec)
from .lin import Lin, affine, flat_apply


class _ChannelAffine(BoundOp):
    """y = x * scale + shift with ``scale``/``shift`` per-example shaped (broadcast over batch).

    Subclasses compute ``ctx['scale']`` and ``ctx['shift']`` in :meth:`forward`.
    """

    keeps_orthogonal_rows = True

    def ibp(self, ctx: Dict[str, Any], x: Interval) -> Interval:
        s, t = ctx["scale"], ctx["shift"]
        return Interval.from_mid_rad(x.mid * s + t, x.rad * s.abs())

    def lin(self, ctx, out, x: Lin) -> Lin:
        return x.scale(ctx["scale"], ctx["shift"])

    def backward(self, ctx, lA, uA, x):
        s, t = ctx["scale"], ctx["shift"]
        lb = maybe(lambda A: sum_spec(A * t), lA)
        ub = maybe(lambda A: sum_spec(A * t), uA)
        return [(maybe(lambda A: A * s, lA), maybe(lambda A: A * s, uA))], (0.0 if lb is None else lb), \
            (0.0 if ub is None else ub)


@register_modules(nn.BatchNorm1d, nn.BatchNorm2d)
class BoundBatchNorm(_ChannelAffine):
    """BN as the per-channel affine map of the statistics the model is in.

    Train mode (or no running stats): the batch statistics of the *clean* input, as the
    model's own forward would use them (biased variance); eval mode: the running stats.
    The running stats are never updated here.
    """

    value_free = True

    def forward(self, ctx, x: Tensor) -> Tensor:
        m: nn.modules.batchnorm._BatchNorm = self.module  # type: ignore[assignment]
        self.prepare(ctx, batch_stats(x) if uses_batch_stats(m) else None, x)
        return x * ctx["scale"] + ctx["shift"]

    def prepare(self, ctx, stats, x: Tensor) -> None:
        """scale/shift from ``stats`` (batch statistics: the clean batch's, or captured from
        the caller's forward) or, in eval mode, the running statistics."""
        m: nn.modules.batchnorm._BatchNorm = self.module  # type: ignore[assignment]
        if uses_batch_stats(m):
            if stats is None:
                raise BoundError(f"node {self.name}: BatchNorm uses batch statistics but none were given")
            mean, var = stats
        else:
            mean, var = m.running_mean, m.running_var
        inv = torch.rsqrt(var + m.eps)
        scale = inv * m.weight if m.weight is not None else inv
        shift = (m.bias if m.bias is not None else 0.0) - mean * scale
        view = (-1,) + (1,) * (x.dim() - 2)
        ctx["scale"], ctx["shift"] = scale.reshape(view), shift.reshape(view)


def uses_batch_stats(m: nn.Module) -> bool:
    """Whether BN module ``m`` normalises with the batch's statistics (train mode / no running)."""
    return bool(m.training or m.running_mean is None)


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel of a BN input [B, C, ...], as BN's train mode uses.

    Two passes (mean, then the mean of squared deviations) rather than ``Tensor.var``: the
    same value, but ``var`` over dims (0, 2, 3) is 2-10x slower on CPU in the forward (1.3-2x
    with the backward) at batch >= 32, and this runs for every BN of the supernet in every
    architecture step (bench/bench_bnstats.py)."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    dev = x - mean.view((-1,) + (1,) * (x.dim() - 2))
    return mean, (dev * dev).mean(dim=dims)


@register_modules(Normalize)
class BoundNormalize(_ChannelAffine):
    """``(x - mean) / std`` per channel (the model's first module)."""

    value_free = True

    def forward(self, ctx, x: Tensor) -> Tensor:
        self.prepare(ctx, None, x)
        return self.module(x)

    def prepare(self, ctx, stats, x: Tensor) -> None:
        m = self.module
        view = (-1,) + (1,) * (x.dim() - 2)
        std = m.std.reshape(view).to(x.dtype)
        ctx["scale"] = 1.0 / std
        ctx["shift"] = -m.mean.reshape(view).to(x.dtype) / std


def _conv_output_padding(in_hw, out_hw, k, s, p, d) -> Tuple[int, ...]:
    return tuple(i - ((o - 1) * st - 2 * pd + dl * (kk - 1) + 1)
                 for i, o, kk, st, pd, dl in zip(in_hw, out_hw, k, s, p, d))


@register_modules(nn.Conv2d, SubsampledConv2d)
class BoundConv2d(BoundOp):
    """Conv2d with any groups (depthwise), dilation, stride, padding."""

    value_free = True

    def forward(self, ctx, x: Tensor) -> Tensor:
        return self.module(x)

    def ibp(self, ctx, x: Interval) -> Interval:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        mid = m._conv_forward(x.mid, m.weight, m.bias)
        rad = m._conv_forward(x.rad, m.weight.abs(), None)
        return Interval.from_mid_rad(mid, rad)

    def ibp_l2(self, ctx, x: Interval) -> Interval:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        mid = m._conv_forward(x.mid, m.weight, m.bias)
        rad = m._conv_forward(x.rad.square(), m.weight.square(), None).clamp(min=0).sqrt()
        return Interval.from_mid_rad(mid, rad)

    def lin(self, ctx, out, x: Lin) -> Lin:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        wa = m.weight.abs()
        return affine(x, lambda w: flat_apply(lambda z: m._conv_forward(z, m.weight, None), w),
                      lambda w: flat_apply(lambda z: m._conv_forward(z, wa, None), w),
                      lambda b: m._conv_forward(b, m.weight, m.bias), lambda b: m._conv_forward(b, wa, None))

    def _back(self, A: Tensor, in_shape) -> Tensor:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        b, S = A.shape[:2]
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return linear_vjp(lambda z: m._conv_forward(z, m.weight, None), A, in_shape)
        A2 = A.reshape((b * S,) + tuple(A.shape[2:]))
        k, d, p = m.kernel_size, m.dilation, m.padding
        if isinstance(m, SubsampledConv2d):
            # the transpose of subsample-then-stride-1: the stride-1 transpose, zero-stuffed
            s = m.stride[0]
            small = (in_shape[0], in_shape[1], -(-in_shape[2] // s), -(-in_shape[3] // s))
            g = A2.new_zeros((b * S,) + tuple(in_shape[1:]))
            ps, ds = m.subsampled()
            g[:, :, ::s, ::s] = self._back_stride1(A2, small, k, (ps, ps), (ds, ds))
            return g.view((b, S) + tuple(in_shape[1:]))
        if m.stride == (1, 1) and min(di * (ki - 1) - pi for ki, di, pi in zip(k, d, p)) >= 0:
            return self._back_stride1(A2, in_shape, k, p, d).view((b, S) + tuple(in_shape[1:]))
        op = _conv_output_padding(in_shape[2:], A.shape[3:], k, m.stride, p, d)
        g = F.conv_transpose2d(A2, m.weight, None, m.stride, p, op, m.groups, d)
        return g.view((b, S) + tuple(in_shape[1:]))

    def _back_stride1(self, A2: Tensor, in_shape, k, p, d) -> Tensor:
        """Transpose of the stride-1 conv with this weight: a plain conv with the flipped,
        channel-swapped kernel (CPU kernels for conv2d are much faster than for conv_transpose2d)."""
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        pad_t = tuple(di * (ki - 1) - pi for ki, di, pi in zip(k, d, p))
        g_, co, ci = m.groups, m.out_channels, m.in_channels
        w = m.weight.view(g_, co // g_, ci // g_, *k).transpose(1, 2).reshape(ci, co // g_, *k)
        return F.conv2d(A2, w.flip(-1, -2), None, 1, pad_t, d, g_)

    def _bias(self, A: Tensor):
        m = self.module
        if m.bias is None:
            return 0.0
        return torch.einsum("bsc,c->bs", A.flatten(3).sum(-1), m.bias)

    def backward(self, ctx, lA, uA, x: Interval):
        shape = x.lower.shape
        lb = 0.0 if lA is None else self._bias(lA)
        ub = 0.0 if uA is None else self._bias(uA)
        return [(maybe(lambda A: self._back(A, shape), lA), maybe(lambda A: self._back(A, shape), uA))], lb, ub


@register_modules(nn.Linear)
class BoundLinear(BoundOp):
    value_free = True

    def forward(self, ctx, x: Tensor) -> Tensor:
        return self.module(x)

    def ibp(self, ctx, x: Interval) -> Interval:
        m: nn.Linear = self.module  # type: ignore[assignment]
        return Interval.from_mid_rad(F.linear(x.mid, m.weight, m.bias), F.linear(x.rad, m.weight.abs()))

    def ibp_l2(self, ctx, x: Interval) -> Interval:
        m: nn.Linear = self.module  # type: ignore[assignment]
        rad = F.linear(x.rad.square(), m.weight.square()).clamp(min=0).sqrt()
        return Interval.from_mid_rad(F.linear(x.mid, m.weight, m.bias), rad)

    def lin(self, ctx, out, x: Lin) -> Lin:
        m: nn.Linear = self.module  # type: ignore[assignment]
        wa = m.weight.abs()
        return affine(x, lambda w: F.linear(w, m.weight), lambda w: F.linear(w, wa),
                      lambda b: F.linear(b, m.weight, m.bias), lambda b: F.linear(b, wa))

    def backward(self, ctx, lA, uA, x: Interval):
        m: nn.Linear = self.module  # type: ignore[assignment]

        def bias(A):
            return 0.0 if (A is None or m.bias is None) else sum_spec(A @ m.bias.unsqueeze(-1))

        return [(maybe(lambda A: A @ m.weight, lA), maybe(lambda A: A @ m.weight, uA))], bias(lA), bias(uA)


class _MonotoneLinear(BoundOp):
    """A linear map with non-negative weights (averages): IBP maps lower->lower, upper->upper."""

    value_free = True

    def apply(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def forward(self, ctx, x: Tensor, *args, **kwargs) -> Tensor:
        return self.apply(x, *args, **kwargs)

    def ibp(self, ctx, x: Interval, *args, **kwargs) -> Interval:
        return Interval(self.apply(x.lower, *args, **kwargs), self.apply(x.upper, *args, **kwargs))

    def lin(self, ctx, out, x: Lin, *args, **kwargs) -> Lin:
        f = lambda z: self.apply(z, *args, **kwargs)  # noqa: E731
        return x.map(lambda w: flat_apply(f, w), f)

    def backward(self, ctx, lA, uA, x: Interval, *args, **kwargs):
        shape = x.lower.shape
        f = lambda A: linear_vjp(lambda z: self.apply(z, *args, **kwargs), A, shape)  # noqa: E731
        return [(maybe(f, lA), maybe(f, uA))] + [None] * len(args), 0.0, 0.0


@register_modules(nn.AvgPool2d)
class BoundAvgPool2d(_MonotoneLinear):
    """Average pool with any divisor rule (``count_include_pad=False`` divides by the number of
    real pixels at the border): the backward is the exact VJP of the pool itself."""

    def apply(self, x: Tensor) -> Tensor:
        return self.module(x)

    def backward(self, ctx, lA, uA, x: Interval):
        m: nn.AvgPool2d = self.module  # type: ignore[assignment]
        if m.ceil_mode or m.divisor_override is not None:
            return super().backward(ctx, lA, uA, x)
        shape = x.lower.shape
        k = nn.modules.utils._pair(m.kernel_size)
        s = nn.modules.utils._pair(m.stride if m.stride is not None else m.kernel_size)
        p = nn.modules.utils._pair(m.padding)
        C, H, W = shape[1:]
        ones = x.lower.new_ones((1, 1, H, W))
        if m.count_include_pad:
            count = torch.full((1, 1) + tuple(lA.shape[-2:] if lA is not None else uA.shape[-2:]),
                               float(k[0] * k[1]), dtype=ones.dtype, device=ones.device)
        else:
            count = F.avg_pool2d(ones, k, s, p, count_include_pad=True) * (k[0] * k[1])
        weight = ones.new_ones((C, 1) + k)

        def back(A: Tensor) -> Tensor:
            b, S = A.shape[:2]
            A2 = (A / count.squeeze(0)).reshape((b * S,) + tuple(A.shape[2:]))
            op = _conv_output_padding((H, W), A.shape[-2:], k, s, p, (1, 1))
            g = F.conv_transpose2d(A2, weight, None, s, p, op, C, 1)
            return g.view((b, S) + tuple(shape[1:]))

        return [(maybe(back, lA), maybe(back, uA))], 0.0, 0.0


@register_functions((F.avg_pool2d, "avg_pool2d"))
class BoundAvgPoolFn(_MonotoneLinear):
    def apply(self, x, *args, **kwargs):
        return F.avg_pool2d(x, *args, **kwargs)


@register_modules(nn.AdaptiveAvgPool2d)
class BoundAdaptiveAvgPool2d(_MonotoneLinear):
    def apply(self, x: Tensor) -> Tensor:
        return self.module(x)

    def backward(self, ctx, lA, uA, x: Interval):
        shape = x.lower.shape
        if self.module.output_size not in (1, (1, 1)):
            return super().backward(ctx, lA, uA, x)
        n = shape[2] * shape[3]

        def back(A: Tensor) -> Tensor:  # global average: every pixel gets A / (H W)
            return (A / n).expand(tuple(A.shape[:3]) + tuple(shape[2:]))

        return [(maybe(back, lA), maybe(back, uA))], 0.0, 0.0


@register_functions((F.adaptive_avg_pool2d, "adaptive_avg_pool2d"))
class BoundAdaptiveAvgPoolFn(_MonotoneLinear):
    def apply(self, x, *args, **kwargs):
        return F.adaptive_avg_pool2d(x, *args, **kwargs)


@register_functions((torch.mean, "mean"))
@register_methods("mean")
class BoundMean(_MonotoneLinear):
    """``x.mean(dims)`` over non-batch dims (global average pooling written by hand)."""

    def apply(self, x, *args, **kwargs):
        dim = kwargs.get("dim", args[0] if args else None)
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else None
        if dims is None or any(d % x.dim() == 0 for d in dims):
            raise BoundError(f"node {self.name}: mean over the batch dimension cannot be bounded per example")
        return torch.mean(x, *args, **kwargs)
