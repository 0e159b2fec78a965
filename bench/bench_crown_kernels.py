"""Kernel choices for the convolutions of a full-CROWN backward pass on the fmnist_small net, side
by side in one process (process CPU time, one thread): for each shape the current kernel and an
equivalent alternative, their ratio, and the max difference (the alternative must agree).
Shapes from a torch.profiler run of one pass (BENCHMARKS.md "what is left to win"): 289-356 rows.

    OMP_NUM_THREADS=1 python bench/bench_crown_kernels.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def timed(f, n: int = 5) -> float:
    f()
    t = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t) / n * 1e3


def depthwise_cl(B: int, C: int, H: int, k: int, d: int) -> tuple:
    """Stride-1 depthwise conv (the flipped-kernel form of its transpose): NCHW vs channels_last."""
    x, w, p = torch.randn(B, C, H, H), torch.randn(C, 1, k, k), d * (k - 1) // 2
    xc = x.contiguous(memory_format=torch.channels_last)
    err = float((F.conv2d(x, w, None, 1, p, d, C) - F.conv2d(xc, w, None, 1, p, d, C)).abs().max())
    return timed(lambda: F.conv2d(x, w, None, 1, p, d, C)), timed(lambda: F.conv2d(xc, w, None, 1, p, d, C)), err


def stride2_transposed(B: int, C: int, H: int, k: int, d: int) -> tuple:
    """Stride-2 depthwise transposed conv vs zero-stuffing + a channels_last stride-1 conv."""
    A, w, p, s, op = torch.randn(B, C, H, H), torch.randn(C, 1, k, k), d * (k - 1) // 2, 2, 1
    pt = d * (k - 1) - p

    def stuffed() -> torch.Tensor:
        z = A.new_zeros(B, C, (H - 1) * s + 1, (H - 1) * s + 1).contiguous(memory_format=torch.channels_last)
        z[:, :, ::s, ::s] = A
        z = F.pad(z, (pt, pt + op, pt, pt + op)).contiguous(memory_format=torch.channels_last)
        return F.conv2d(z, w.flip(-1, -2), None, 1, 0, d, C)

    ref = lambda: F.conv_transpose2d(A, w, None, s, p, op, C, d)  # noqa: E731
    return timed(ref), timed(stuffed), float((ref() - stuffed()).abs().max())


def stem_to_one_channel(B: int, C: int, H: int) -> tuple:
    """The stem's backward (C -> 1 channel, 3x3): one conv vs a 1x1 conv to 9 taps + shift-adds."""
    A, w = torch.randn(B, C, H, H), torch.randn(1, C, 3, 3)
    w9 = w[0].reshape(C, 9).t().reshape(9, C, 1, 1)

    def taps() -> torch.Tensor:
        t = F.pad(F.conv2d(A, w9), (1, 1, 1, 1))
        out = A.new_zeros(B, H, H)
        for i in range(9):
            out += t[:, i, i // 3:i // 3 + H, i % 3:i % 3 + H]
        return out.unsqueeze(1)

    ref = lambda: F.conv2d(A, w, None, 1, 1)  # noqa: E731
    return timed(ref), timed(taps), float((ref() - taps()).abs().max())


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [("depthwise 3x3 s1, NCHW -> channels_last", (289, 8, 28, 3, 1), depthwise_cl),
            ("depthwise 3x3 dil 2 s1, NCHW -> channels_last", (289, 8, 28, 3, 2), depthwise_cl),
            ("depthwise 5x5 dil 2 s1, NCHW -> channels_last", (289, 16, 14, 5, 2), depthwise_cl),
            ("depthwise 5x5 dil 2 stride-2 transposed -> stuffed channels_last", (289, 16, 14, 5, 2), stride2_transposed),
            ("stem 24 -> 1 channel 3x3 -> 1x1 to 9 taps + shifts", (356, 24, 28), stem_to_one_channel)]
    print("| kernel | shape | current ms | alternative ms | ratio | max abs diff |\n|---|---|---|---|---|---|")
    for name, shape, fn in rows:
        a, b, err = fn(*shape)
        print(f"| {name} | {shape} | {a:.1f} | {b:.1f} | {a / b:.1f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
