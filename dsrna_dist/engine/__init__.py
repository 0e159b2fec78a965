"""Distributed runtime: accelerator setup, logging, checkpoints, sharded evaluation.

Public API (see each module's docstring for the *why*):
- ``setup_runtime(cfg, stage) -> Runtime``, ``teardown(rt, code)``, ``run_stage(main, cfg, stage)``,
  ``memory_format(cfg.dist)`` (the one layout every stage puts its model and batches in)
- ``CheckpointManager``, ``capture_rng`` (collective), ``restore_rng``, ``training_state``,
  ``restore_training_state``, ``CheckpointError``
- ``shard_indices``, ``gather_objects`` (collective)
- ``broadcast_parameters``, ``all_reduce_mean_``, ``assert_identical_across_ranks`` (collective)
- ``TBWriter``

Names resolve lazily (PEP 562): ``from dsrna_dist.engine import CheckpointError`` or
``dsrna_dist.engine.io`` do not import torch; only the submodule that defines a name is loaded.
Why: error reporting and ``--help`` run before (or without) torch, and importing it costs seconds.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "checkpoint": ("HARMLESS_KEYS", "STRUCTURAL_KEYS", "CheckpointManager", "capture_rng", "compare_configs",
                   "load_checkpoint", "restore_rng", "restore_training_state", "training_state"),
    "errors": ("CheckpointError",),
    "gather": ("gather_objects", "shard_indices"),
    "runtime": ("Runtime", "build_accelerator", "memory_format", "report_error", "run_checked", "run_stage",
                "setup_runtime", "teardown"),
    "seeding": ("derive_seed", "rank_generator", "seed_everything", "seed_rank_streams", "set_deterministic"),
    "sync": ("all_reduce_mean_", "assert_identical_across_ranks", "broadcast_parameters"),
    "tb": ("TBWriter",),
    "unwrap": ("unwrap_model",),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
