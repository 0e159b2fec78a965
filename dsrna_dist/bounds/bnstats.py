"""Capture the batch statistics a model's BatchNorms use in one forward, for value-free bounds.

During search BN normalises with the statistics of the batch it sees. The bound engine needs
exactly those statistics to bound the function the architecture objective evaluates; taking
them from the objective's own forward (rather than a second clean pass inside the engine)
lets the engine skip its clean pass altogether (``BoundedModel.bounds(..., bn_stats=...)``).
The statistics stay attached to the autograd graph, so bound gradients flow through them
into alpha as the BN's own do.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional, Tuple

from torch import Tensor, nn

from .graph import unwrap
from .ops_linear import batch_stats, uses_batch_stats

Stats = Dict[nn.Module, Optional[Tuple[Tensor, Tensor]]]


@contextmanager
def capture_bn_stats(model: nn.Module, bn_modules: Optional[Iterable[nn.Module]] = None) -> Iterator[Stats]:
    """``with capture_bn_stats(model) as stats: model(x)`` -> {BN: (mean, biased var)} of x.

    ``bn_modules``: the BatchNorms to hook, when the caller already has them listed (a
    BoundedModel's ``bn_modules``; this runs every architecture step, and a module scan of a
    supernet is thousands of modules); default: every BatchNorm in ``model``.
    Only BatchNorms that use batch statistics are hooked. A BN module called more than once
    in the forward gets ``None`` (ambiguous statistics): the engine then falls back to its
    own clean pass rather than use the wrong ones.
    """
    stats: Stats = {}

    def hook(m: nn.Module, args) -> None:
        if m in stats:
            stats[m] = None
            return
        stats[m] = batch_stats(args[0])

    if bn_modules is None:
        bn_modules = [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in bn_modules if uses_batch_stats(m)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
