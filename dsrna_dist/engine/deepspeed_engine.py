"""DeepSpeed ZeRO-0/1/2 for retraining, driven directly (no Accelerate plugin, no transformers).

Why these choices (measured, see notes/distributed-on-cpu.md):
* a *torch* optimizer is passed in: DeepSpeed's own Adam/SGD builders JIT-compile fused ops
  (~74 s on CPU); ZeRO wraps the torch optimizer and partitions its state instead;
* the process group already exists (setup_runtime / Accelerate made it), so DeepSpeed is told
  not to create one and simply wraps it (gloo on CPU, nccl on CUDA);
* the optimizer state of ZeRO-1/2 is partitioned across ranks. DeepSpeed's own checkpoint
  files are unpickled with ``weights_only=False``; instead each rank's *base* (torch) optimizer
  state - plain tensors - is gathered into our own weights-only checkpoint, and each rank loads
  its own partition back (same world size required, which the checkpoint records).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_optimizer_state as load_torch_optimizer_state
from .errors import CheckpointError


def import_deepspeed() -> Any:
    """Import DeepSpeed, choosing its CPU accelerator on a GPU-less box (before the import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: WPS433 - optional dependency
    except ImportError as e:  # pragma: no cover - depends on the environment
        from ..config import ConfigError
        raise ConfigError("key 'engine': deepspeed is not installed (pip install 'dsrna_dist[deepspeed]')"
                          f" ({e})") from None
    return deepspeed


def ds_config(*, micro_batch: int, world_size: int, zero_stage: int, grad_clip: float,
              autocast_bf16: bool = False, num_parameters: Optional[int] = None) -> Dict[str, Any]:
    """The DeepSpeed JSON config for one optimizer step per micro-batch (no accumulation).

    ``autocast_bf16``: bf16 through ``torch.autocast`` with fp32 weights and fp32 gradient
    communication, as on the DDP path. Why a config section: DeepSpeed's forward re-enters
    autocast with its own setting, which is *off* unless ``torch_autocast`` says otherwise, so
    an outer CUDA autocast alone trains in fp32. ``num_parameters``: ZeRO-1/2 buckets sized to
    the model (DeepSpeed's default 5e8 elements allocates ~2 GB per bucket per step)."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(micro_batch) * int(world_size),
        "zero_optimization": {"stage": int(zero_stage)},
        "steps_per_print": 2 ** 31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # a plain torch optimizer under ZeRO
        # always explicit: DeepSpeed's default when the key is absent is 1.0 (0.19.x), so
        # leaving it out for "off" silently clipped every step at norm 1
        "gradient_clipping": float(grad_clip),
    }
    if autocast_bf16:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                 "lower_precision_safe_modules": []}  # gradients all-reduced in fp32
    if num_parameters is not None and zero_stage > 0:
        bucket = int(max(num_parameters, 1_000_000))
        cfg["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return cfg


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any]) -> Any:
    """``deepspeed.initialize`` on the existing process group; returns the DeepSpeedEngine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(config),
                                           dist_init_required=False)
    return engine


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that actually steps (ZeRO wraps it; stage 0 may hand it back as is)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lr(engine: Any, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


def local_optimizer_state(engine: Any) -> Dict[str, Any]:
    """This rank's optimizer state (its ZeRO partition): tensors and plain types only."""
    return base_optimizer(engine).state_dict()


def gather_optimizer_states(engine: Any) -> List[Dict[str, Any]]:
    """Every rank's partition, rank order, on every rank. COLLECTIVE."""
    local = {k: v for k, v in local_optimizer_state(engine).items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    local = _to_cpu(local)
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def load_optimizer_state(engine: Any, states: List[Mapping[str, Any]], source: str) -> None:
    """Load this rank's partition from :func:`gather_optimizer_states` output."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(states) != world:
        raise CheckpointError(f"{source}: DeepSpeed optimizer state was saved by {len(states)} ranks, "
                              f"this run has {world}; ZeRO partitions need the same world size")
    try:
        load_torch_optimizer_state(base_optimizer(engine), dict(states[rank]))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: DeepSpeed optimizer state does not fit: {e}") from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def maybe_engine_module(model: Any) -> Optional[nn.Module]:
    """The wrapped module of a DeepSpeedEngine, else None."""
    return getattr(model, "module", None) if type(model).__name__ == "DeepSpeedEngine" else None
