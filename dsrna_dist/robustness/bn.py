"""Per-example input Jacobians of a network whose BatchNorms use batch statistics.

Why: in a DARTS supernet in train mode every node output is batch-normalised, so each
example's logits depend on the whole batch, and the sum over the batch of any logit does not
depend on the input at all (zero batch mean per channel). A vector-Jacobian product with the
same vector for every example -- the textbook way to get Jacobian rows of a batch -- then
returns ~0 instead of the per-example rows (measured: 5e-7 against 7.5).

The network the search evaluates normalises each example with its batch's statistics. We
take its per-example Jacobian *at those statistics*: mean and variance of every BN are
computed from the batch (a forward the caller already ran, or one of our own) and then held
fixed while the examples are differentiated w.r.t. their own input. The statistics stay on the
autograd graph of the weights and the architecture parameters (they are computed from the
batch's activations), so d R / d alpha still sees how alpha changes the normalisation; only the
input path through the statistics -- the coupling between examples -- is cut. That coupling is
what separates our rows from the exact diagonal blocks d f(x_i) / d x_i of the batched function:
through the batch mean and variance, each example moves the statistics by O(1/B)
(tests/test_jacobian_bn.py measures it).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

Stats = Dict[nn.Module, Optional[Tuple[torch.Tensor, torch.Tensor]]]


def batch_stat_bns(model: nn.Module) -> List[nn.Module]:
    """The BatchNorms of ``model`` that normalise with batch statistics (train mode / no running)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]


def _stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..bounds.ops_linear import batch_stats  # one definition of BN's (mean, biased var)

    return batch_stats(x)


@contextlib.contextmanager
def capture_stats(bns: Iterable[nn.Module]) -> Iterator[Stats]:
    """``with capture_stats(bns) as s: model(x)`` -> {BN: (mean, biased var)} of that forward,
    attached to its graph. A BN called twice in the forward maps to None (ambiguous)."""
    stats: Stats = {}

    def hook(m: nn.Module, args) -> None:
        stats[m] = None if m in stats else _stats(args[0])

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen_stats(stats: Stats) -> Iterator[None]:
    """Inside: each BN in ``stats`` normalises with the given (mean, var) instead of its
    input's, and leaves its running statistics alone (this forward is not a training step)."""
    patched = []
    for m, s in stats.items():
        if s is None:
            raise ValueError("frozen_stats: a BatchNorm with ambiguous statistics (called twice)")
        mean, var = s

        def fwd(inp: torch.Tensor, m: nn.Module = m, mean: torch.Tensor = mean,
                var: torch.Tensor = var) -> torch.Tensor:
            # by hand: F.batch_norm refuses statistics that require grad
            shape = (1, -1) + (1,) * (inp.dim() - 2)
            out = (inp - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
            if m.weight is not None:
                out = out * m.weight.view(shape) + m.bias.view(shape)
            return out

        m.forward = fwd  # instance attribute shadows the class method
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
