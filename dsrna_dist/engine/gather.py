"""Sharded evaluation with an exact gather: every example evaluated once, none duplicated.

Why not DistributedSampler: it pads the last shard with repeated examples, which silently
biases metrics on small eval sets. Strided shards without padding are uneven by at most one,
and ``all_gather_object`` does not need equal sizes.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch.distributed as dist


def shard_indices(n: int, rank: int, world: int) -> List[int]:
    """Indices ``rank, rank + world, ...`` below ``n``: disjoint, covering, no padding."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} for world size {world}")
    return list(range(rank, n, world))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(records: Sequence[Any], key: Optional[str] = "index") -> List[Any]:
    """All ranks' records concatenated (rank order) on every rank; identity at world size 1.

    When every record is a mapping holding ``key``, the result is sorted by it and duplicates of
    a key (padding from loaders that pad, e.g. FFCV ``distributed=True``) are dropped, so the
    original example order comes back exactly. COLLECTIVE: call it on every rank.
    """
    records = list(records)
    world = _world()
    if world > 1:
        parts: List[Any] = [None] * world
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    if key and records and all(isinstance(r, dict) and key in r for r in records):
        seen, unique = set(), []
        for r in sorted(records, key=lambda r: r[key]):
            if r[key] not in seen:
                seen.add(r[key])
                unique.append(r)
        records = unique
    return records
