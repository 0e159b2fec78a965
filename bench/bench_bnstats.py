"""BN batch statistics: ``Tensor.var`` over dims (0, 2, 3) versus the two-pass formula of
``dsrna_dist.bounds.ops_linear.batch_stats`` (which the architecture step runs for every BN of
the supernet, to capture the statistics DSRNA-CB bounds with). Forward and backward, 1 thread,
on the BN input shapes of the bench_metrics supernet; both variants timed alternately.

    .venv/bin/python bench/bench_bnstats.py
"""
from __future__ import annotations

import time
from typing import Callable, Tuple

import torch

from dsrna_dist.bounds.ops_linear import batch_stats


def with_var(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The previous implementation."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def timed(fn: Callable, x: torch.Tensor, backward: bool, n: int = 50) -> float:
    def once() -> None:
        m, v = fn(x)
        if backward:
            torch.autograd.grad(m.sum() + v.sum(), x)
    once()
    t = time.perf_counter()
    for _ in range(n):
        once()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'BN input':>18s} {'layout':>14s} {'pass':>8s} {'var (us)':>9s} {'two-pass (us)':>14s} {'ratio':>6s}")
    for shape in [(8, 2, 16, 16), (32, 2, 16, 16), (32, 8, 8, 8), (128, 2, 16, 16), (128, 8, 16, 16),
                  (128, 16, 8, 8), (128, 32, 4, 4)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
            for backward in (False, True):
                a = min(timed(with_var, x, backward) for _ in range(2))
                b = min(timed(batch_stats, x, backward) for _ in range(2))
                print(f"{str(shape):>18s} {str(fmt).split('.')[-1]:>14s} {'fwd+bwd' if backward else 'fwd':>8s} "
                      f"{a:9.0f} {b:14.0f} {a / b:6.2f}")


if __name__ == "__main__":
    main()
