"""Distributed runtime: accelerator setup, logging, checkpoints, sharded evaluation.

Public API (see each module's docstring for the *why*):
- ``setup_runtime(cfg, stage) -> Runtime``, ``teardown(rt, code)``, ``run_stage(main, cfg, stage)``
- ``CheckpointManager``, ``capture_rng`` (collective), ``restore_rng``, ``training_state``,
  ``restore_training_state``, ``CheckpointError``
- ``shard_indices``, ``gather_objects`` (collective)
- ``broadcast_parameters``, ``all_reduce_mean_``, ``assert_identical_across_ranks`` (collective)
- ``TBWriter``
"""
from .checkpoint import (HARMLESS_KEYS, STRUCTURAL_KEYS, CheckpointManager, capture_rng,
                         compare_configs, load_checkpoint, restore_rng, restore_training_state,
                         training_state, unwrap_model)
from .errors import CheckpointError
from .gather import gather_objects, shard_indices
from .runtime import (Runtime, build_accelerator, report_error, run_checked, run_stage, setup_runtime,
                      teardown)
from .seeding import derive_seed, rank_generator, seed_everything, seed_rank_streams, set_deterministic
from .sync import all_reduce_mean_, assert_identical_across_ranks, broadcast_parameters
from .tb import TBWriter

__all__ = [
    "HARMLESS_KEYS", "STRUCTURAL_KEYS", "CheckpointError", "CheckpointManager", "Runtime",
    "TBWriter", "all_reduce_mean_", "assert_identical_across_ranks", "broadcast_parameters",
    "build_accelerator", "capture_rng", "compare_configs", "derive_seed", "gather_objects",
    "load_checkpoint", "rank_generator", "report_error", "restore_rng", "restore_training_state",
    "run_checked", "run_stage", "seed_everything", "seed_rank_streams", "set_deterministic", "setup_runtime",
    "shard_indices", "teardown", "training_state", "unwrap_model",
]
