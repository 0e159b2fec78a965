"""Small layers shared by the supernet and derived networks.

Normalization lives inside every model, so inputs, attack radii and certified bounds are all
in [0, 1] pixel units.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics as (non-trainable) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} entries, std {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


class SubsampledConv2d(nn.Conv2d):
    """A strided, dilated, "same"-padded Conv2d computed as subsample-then-stride-1.

    When the stride ``s`` divides both the dilation and the padding, every tap of output ``i``
    reads input ``s*i - p + d*a = s*(i - p/s + (d/s)*a)``: only every ``s``-th input pixel is
    ever read, so the conv equals a stride-1 conv (dilation ``d/s``, padding ``p/s``) of
    ``x[..., ::s, ::s]``. Same products, same sums: the forward is bit-identical in the
    contiguous layout on CPU (tested), the rest equal up to float summation order. Why: CPU
    kernels for strided dilated depthwise convs are slow (DARTS' stride-2 ``dil_conv`` at
    28x28 is 2-4x faster this way, up to 9x in channels_last: BENCHMARKS.md "CPU layout").
    A 1x1 kernel without padding reads ``x[s*i]`` whatever the dilation, so it is rewritten too
    (FactorizedReduce's stride-2 convs): on an AVX2 CPU, torch 2.14.1's backward of a
    channels_last 1x1 stride-2 conv with few (< 8) input channels corrupts the heap (measured
    in isolation: 2 -> 1 channels at 8x8 aborts with "corrupted double-linked list"), while
    subsample-then-stride-1 runs clean.
    Same parameters and state-dict keys as ``nn.Conv2d``, so every checkpoint loads. No device
    branch, so torch.fx traces it (not timed on CUDA yet: bench/gpu_check.sh).
    """

    @staticmethod
    def applies(kernel: int, stride: int, padding: int, dilation: int) -> bool:
        """Whether the rewrite is exact for these (square) settings, output size included."""
        if stride > 1 and kernel == 1:
            return padding == 0
        return (stride > 1 and dilation % stride == 0 and padding % stride == 0
                and 2 * padding == dilation * (kernel - 1))

    def subsampled(self) -> "tuple[int, int]":
        """(padding, dilation) of the stride-1 conv on the subsampled input."""
        s = self.stride[0]
        return self.padding[0] // s, (self.dilation[0] // s if self.kernel_size[0] > 1 else 1)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        k, s, p, d = self.kernel_size[0], self.stride[0], self.padding, self.dilation[0]
        if (self.kernel_size[1], self.stride[1], self.dilation[1]) != (k, s, d) or isinstance(p, str) \
                or p[0] != p[1] or not self.applies(k, s, p[0], d) or self.padding_mode != "zeros":
            raise ValueError(f"SubsampledConv2d: not exact for kernel {self.kernel_size}, stride {self.stride}, "
                             f"padding {self.padding}, dilation {self.dilation}, padding_mode {self.padding_mode}")

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None") -> torch.Tensor:
        s = self.stride[0]
        p, d = self.subsampled()
        return nn.functional.conv2d(x[:, :, ::s, ::s], weight, bias, 1, p, d, self.groups)
