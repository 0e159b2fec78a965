"""Small collectives for state kept outside DDP (e.g. architecture parameters).

Why: DDP only synchronises the parameters of the module it wraps. Anything optimised outside
it must be broadcast once at start and have its gradient mean-reduced every step, or ranks
drift apart with no error (measured: see notes/distributed-on-cpu.md).
All functions are no-ops at world size 1 and COLLECTIVE otherwise (call on every rank).
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tensors(ts: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in ts if t is not None]


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's tensors with rank ``src``'s values (in place)."""
    if not _active():
        return
    for p in _tensors(params):
        dist.broadcast(p.data, src=src)


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """In-place mean over ranks (e.g. ``[p.grad for p in alphas]``); None entries skipped.

    One flat buffer per dtype/device, so a call costs one all-reduce, not one per tensor.
    """
    if not _active():
        return
    world = dist.get_world_size()
    groups: dict = {}
    for t in _tensors(tensors):
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        off = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n


@torch.no_grad()
def any_rank(flag: bool, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank iff ``flag`` is true on some rank: a decision all ranks take together
    (a rank that stops alone would leave the others waiting in the next collective)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def assert_identical_across_ranks(tensors: Iterable[torch.Tensor]) -> bool:
    """True iff every tensor is bitwise equal to rank 0's copy on every rank (same on all ranks).

    Compares raw bytes, so -0.0 vs 0.0 or differing NaN payloads count as different.
    """
    ts = _tensors(tensors)
    if not _active():
        return True
    ok = True
    for t in ts:
        mine = t.detach().contiguous().reshape(-1).view(torch.uint8)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        ok = ok and torch.equal(mine, ref)
    dev = ts[0].device if ts else torch.device("cpu")
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
