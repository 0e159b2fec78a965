"""Create the default process group ourselves, restart-safely, before Accelerate does.

Why: under ``torchrun --max-restarts`` (and ``accelerate launch --max_restarts``) the workers
share the elastic agent's TCPStore, which outlives a restart. The stock ``env://`` rendezvous
reuses the same keys in it, so restarted ranks can read the dead ranks' gloo addresses and
hang or fail (pytorch #135712, #167288). Namespacing every key by
``TORCHELASTIC_RESTART_COUNT`` in a :class:`~torch.distributed.PrefixStore` gives each attempt
a clean rendezvous. Accelerate reuses an already-initialised default group, so doing this
first is transparent to it.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate, SLURM script) exported the rendezvous env."""
    return all(os.environ.get(k) for k in _ENV_KEYS)


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resolve_backend(name: str, cuda: Optional[bool] = None) -> str:
    """``auto`` -> nccl on CUDA, gloo on CPU; refuse nccl without CUDA (it would fail later)."""
    from dsrna_dist.config import ConfigError

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ConfigError("key 'dist.backend': nccl needs CUDA; use gloo or auto on CPU")
    return name


def init_process_group_from_env(backend: str, timeout: timedelta) -> bool:
    """Initialise the default group from launcher env on a restart-prefixed store.

    Returns True when a (possibly pre-existing) default group is available afterwards.
    """
    if dist.is_initialized():
        return True
    if not launched_distributed():
        return False
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # torchrun/accelerate: the agent hosts a store at MASTER_ADDR:MASTER_PORT; plain env (e.g.
    # srun without torchrun): rank 0 hosts it.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    store = dist.TCPStore(host, port, world_size=None if agent else world,
                          is_master=(not agent and rank == 0), timeout=timeout,
                          wait_for_workers=False, multi_tenant=not agent)
    prefixed = dist.PrefixStore(f"dsrna_dist/attempt_{restart_count()}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    return True
