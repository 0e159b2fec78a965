"""The DARTS primitives, registered by name.

Every op is built only from standard torch modules (ReLU, Conv2d, BatchNorm2d, AvgPool2d,
MaxPool2d, Identity) plus the two small custom modules here (:class:`Zero`,
:class:`FactorizedReduce`) and ``layers.SubsampledConv2d`` (a Conv2d with a faster CPU kernel
for the strided dilated convs), so the bound engine needs one bound class per module type and
nothing else. Search ops use affine-free BatchNorm (``affine=False``); derived networks use
affine BN. Factories take ``(C, stride, affine)`` as in the DARTS reference code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..registry import Registry
from .layers import SubsampledConv2d

OpFactory = Callable[[int, int, bool], nn.Module]
OPS: Registry[OpFactory] = Registry("op")


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv -> BN, the DARTS preprocessing block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 dilation: int, affine: bool = True) -> None:
        conv = SubsampledConv2d if SubsampledConv2d.applies(kernel, stride, padding, dilation) else nn.Conv2d
        super().__init__(
            nn.ReLU(inplace=False),
            conv(c_in, c_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable blocks; only the first one strides."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 affine: bool = True) -> None:
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine),
        )


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (MixedOp skips it; derived nets never hold it)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs, concatenated, then BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        # subsample-then-1x1: the same products; also avoids a heap-corrupting CPU kernel
        # (layers.SubsampledConv2d)
        self.conv_1 = SubsampledConv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = SubsampledConv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _pool(kind: str, c: int, stride: int, affine: bool) -> nn.Module:
    pool = (nn.MaxPool2d(3, stride=stride, padding=1) if kind == "max"
            else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False))
    # Search pools get an affine-free BN (as the DARTS reference); derived nets use the bare pool.
    return pool if affine else nn.Sequential(pool, nn.BatchNorm2d(c, affine=False))


OPS.register("none", lambda c, stride, affine: Zero(stride))
OPS.register("max_pool_3x3", lambda c, stride, affine: _pool("max", c, stride, affine))
OPS.register("avg_pool_3x3", lambda c, stride, affine: _pool("avg", c, stride, affine))
OPS.register("skip_connect", lambda c, stride, affine:
             nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine))
OPS.register("sep_conv_3x3", lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine))
OPS.register("sep_conv_5x5", lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine))
OPS.register("sep_conv_7x7", lambda c, stride, affine: SepConv(c, c, 7, stride, 3, affine))
OPS.register("dil_conv_3x3", lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine))
OPS.register("dil_conv_5x5", lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine))


def build_op(name: str, c: int, stride: int, affine: bool) -> nn.Module:
    """Instantiate a registered primitive; unknown names list the valid ones."""
    return OPS.get(name, key="model.primitives")(c, stride, affine)
