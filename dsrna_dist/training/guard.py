"""The non-finite guard: a NaN/inf loss or gradient stops every rank before the step is applied.

Why all ranks together: a rank that stops alone leaves the others blocked in the next
collective; why before ``optimizer.step``: the last good checkpoint must stay the last one
written (nothing non-finite ever reaches ``last.pt``, ``best.pt`` or ``metrics.jsonl``).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..engine.sync import any_rank


class NonFiniteError(RuntimeError):
    """The loss, a gradient or a weight became NaN/inf; nothing was applied or saved."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True iff every floating tensor is finite (one fused reduction, one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def any_rank_nonfinite(*values: float | torch.Tensor, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank iff some value on some rank is NaN/inf (one all-reduce)."""
    bad = False
    for v in values:
        f = float(v) if not isinstance(v, torch.Tensor) else float(v.detach().float().sum())
        bad = bad or not math.isfinite(f)
    return any_rank(bad, device)
