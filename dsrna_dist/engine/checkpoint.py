"""Checkpoints: atomic ``last.pt``/``best.pt``, safe loading, config checks, exact RNG resume.

Why each piece:
- atomic writes (temp + fsync + rename): a run killed mid-save keeps the previous good file;
- ``torch.load(weights_only=True)`` only: a checkpoint is data, never code. ``save`` proves
  this by loading its own bytes back the same way before anything on disk is replaced, so a
  state that could not be resumed is refused at save time, not discovered at resume time;
- every rank's RNG state (python, numpy, torch, cuda) gathered into the checkpoint: with
  the same world size, resuming continues bit-exactly (on CPU) instead of approximately;
- a saved config is compared with the current one: keys that change what the state *means*
  (``STRUCTURAL_KEYS``) must match; ``HARMLESS_KEYS`` may differ silently; any other
  difference is logged as a warning (or refused with ``strict=True``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import CheckpointError
from .io import atomic_write_bytes
from .seeding import derive_seed, seed_everything
from .unwrap import unwrap_model

log = logging.getLogger("dsrna_dist")

# Must match between a checkpoint and the config resuming from it: they change the shape or
# meaning of the saved tensors (architecture, dataset/classes, optimizer type, engine format).
STRUCTURAL_KEYS: Tuple[str, ...] = (
    "model.*", "data.name", "data.image_size", "strategy.name", "strategy.order",
    "robustness.name", "optim.name", "engine", "zero_stage",
)
# May differ freely: where/how the run executes, not what it computes; `epochs` and
# `steps_per_epoch` so a finished run can be extended.
HARMLESS_KEYS: Tuple[str, ...] = (
    "run.*", "dist.*", "epochs", "steps_per_epoch", "data.root", "data.ffcv_dir",
    "data.loader", "data.num_workers", "data.download", "data.eval_batch_size",
)


# --------------------------------------------------------------------------- config checks
def flatten_config(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay leaves (compared whole)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


_MISSING = "<missing>"


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                    structural: Sequence[str] = STRUCTURAL_KEYS,
                    harmless: Sequence[str] = HARMLESS_KEYS,
                    strict: bool = False) -> Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, Any, Any]]]:
    """Return ``(errors, warnings)`` as ``(key, saved_value, current_value)`` lists.

    A key is an error when it matches ``structural`` (or, with ``strict``, anything that is not
    ``harmless``); harmless keys are ignored; the rest are warnings. Structural wins over harmless.
    """
    a, b = flatten_config(saved), flatten_config(current)
    errors, warnings = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va == vb:
            continue
        if _matches(key, structural) or (strict and not _matches(key, harmless)):
            errors.append((key, va, vb))
        elif not _matches(key, harmless):
            warnings.append((key, va, vb))
    return errors, warnings


def _as_dict(cfg: Any) -> Dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        from dsrna_dist.config import to_dict

        return to_dict(cfg)
    return dict(cfg)


# --------------------------------------------------------------------------- RNG
def _local_rng() -> Dict[str, Any]:
    """This process's generator states as tensors and plain types (weights_only-loadable)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    st: Dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_local_rng(st: Mapping[str, Any]) -> None:
    v, keys, gauss = st["python"]
    random.setstate((int(v), tuple(int(k) for k in keys), gauss))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(st["torch"].cpu().to(torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        states = list(st["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)


def _dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng() -> Dict[str, Any]:
    """Every rank's RNG states, gathered to all ranks. COLLECTIVE: call it on every rank."""
    rank, world = _dist_info()
    local = _local_rng()
    if world == 1:
        return {"world_size": 1, "ranks": [local]}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return {"world_size": world, "ranks": gathered}


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore this rank's generators from :func:`capture_rng` output (local, no collective).

    With a different world size than at save time, the streams cannot continue exactly; each
    rank then re-seeds from (a hash of the saved rank-0 state, rank): reproducible, distinct
    per rank, and a warning says so.
    """
    rank, world = _dist_info()
    ranks = list(state["ranks"])
    if len(ranks) == world:
        _set_local_rng(ranks[rank])
        return
    log.warning("checkpoint RNG states are for %d ranks, running %d: re-seeding per rank "
                "(not a bit-exact continuation)", len(ranks), world)
    digest = hashlib.sha256(ranks[0]["torch"].cpu().numpy().tobytes()).digest()
    seed_everything(derive_seed(int.from_bytes(digest[:7], "little"), rank))


# --------------------------------------------------------------------------- training state
def training_state(*, models: Mapping[str, nn.Module], optimizers: Optional[Mapping[str, Any]] = None,
                   schedulers: Optional[Mapping[str, Any]] = None, step: int = 0, epoch: int = 0,
                   config: Any = None, rng: Optional[Mapping[str, Any]] = None,
                   **extra: Any) -> Dict[str, Any]:
    """Assemble a checkpoint dict: each model's state_dict under its own top-level key
    (``models={"model": net}`` gives ``state["model"]``), optimizers/schedulers by name.

    Pass ``rng=capture_rng()`` (collective, all ranks) to make the resume bit-exact.
    """
    state: Dict[str, Any] = {name: unwrap_model(m).state_dict() for name, m in models.items()}
    state["optimizers"] = {k: o.state_dict() for k, o in (optimizers or {}).items()}
    state["schedulers"] = {k: s.state_dict() for k, s in (schedulers or {}).items()}
    state.update(step=int(step), epoch=int(epoch))
    if config is not None:
        state["config"] = _as_dict(config)
    if rng is not None:
        state["rng"] = dict(rng)
    state.update(extra)
    return state


_SCHEDULED = ("params", "lr", "initial_lr")  # not settings: the params, and what a schedule moves


def load_optimizer_state(opt: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """``opt.load_state_dict(saved)``, keeping this run's param-group settings.

    Why: torch restores the *saved* groups' momentum, weight decay, betas, nesterov..., so a key
    changed on resume (which the config check logs as changed) would silently keep its old
    value. The state (momentum buffers, Adam moments, step counts) comes from the checkpoint,
    the settings from the config, except the lr (and torch's ``initial_lr``), which belong to
    the schedule: a torch LR scheduler restored after this keeps them in the groups."""
    fresh = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, settings in zip(opt.param_groups, fresh):
        group.update(settings)


def restore_training_state(state: Mapping[str, Any], *, models: Mapping[str, nn.Module],
                           optimizers: Optional[Mapping[str, Any]] = None,
                           schedulers: Optional[Mapping[str, Any]] = None,
                           rng: bool = True, source: str = "checkpoint") -> Tuple[int, int]:
    """Load what :func:`training_state` saved into live objects; returns ``(step, epoch)``."""
    for name, m in models.items():
        if name not in state:
            raise CheckpointError(f"{source}: no model state {name!r} (has {sorted(state)})")
        try:
            unwrap_model(m).load_state_dict(state[name])
        except RuntimeError as e:
            raise CheckpointError(f"{source}: model {name!r} does not fit: "
                                  f"{str(e).strip().splitlines()[0]}") from None
    for group, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, obj in (objs or {}).items():
            saved = state.get(group, {})
            if name not in saved:
                raise CheckpointError(f"{source}: no {group[:-1]} state {name!r}")
            try:
                if isinstance(obj, torch.optim.Optimizer):
                    load_optimizer_state(obj, saved[name])
                else:
                    obj.load_state_dict(saved[name])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{source}: {group[:-1]} {name!r} does not fit: {e}") from None
    if rng and "rng" in state:
        restore_rng(state["rng"])
    return int(state.get("step", 0)), int(state.get("epoch", 0))


# --------------------------------------------------------------------------- manager
class CheckpointManager:
    """``<run_dir>/checkpoints/{last,best}.pt``; writes happen on the main process only.

    ``save`` contains no collective, so calling it on every rank or only on rank 0 is both
    fine; build the state (including :func:`capture_rng`, which *is* collective) on all ranks.
    """

    def __init__(self, run_dir: str | Path, is_main: Optional[bool] = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.is_main = (_dist_info()[0] == 0) if is_main is None else is_main

    @property
    def last_path(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def save(self, state: Mapping[str, Any], *, is_best: bool = False) -> Optional[Path]:
        """Atomically write last.pt (and best.pt when ``is_best``); returns last.pt on rank 0."""
        if not self.is_main:
            return None
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
        try:  # prove it is resumable with weights_only before replacing anything
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"refusing to save {self.last_path}: the state cannot be loaded "
                                  f"with weights_only=True ({_first_line(e)}); store tensors and "
                                  f"plain python types only") from None
        atomic_write_bytes(str(self.last_path), data)
        if is_best:
            atomic_write_bytes(str(self.best_path), data)
        return self.last_path

    def latest(self) -> Optional[Path]:
        return self.last_path if self.last_path.is_file() else None

    def load(self, path: str | Path, expected_config: Any = None, *,
             structural: Sequence[str] = STRUCTURAL_KEYS, harmless: Sequence[str] = HARMLESS_KEYS,
             strict: bool = False, map_location: Any = "cpu") -> Dict[str, Any]:
        return load_checkpoint(path, expected_config, structural=structural, harmless=harmless,
                               strict=strict, map_location=map_location)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _fmt(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def load_checkpoint(path: str | Path, expected_config: Any = None, *,
                    structural: Sequence[str] = STRUCTURAL_KEYS, harmless: Sequence[str] = HARMLESS_KEYS,
                    strict: bool = False, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` + config check; every failure is a CheckpointError
    naming the file (and the differing key). Reads only; never modifies any file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p} is unreadable (corrupt, truncated or not a "
                              f"weights-only torch file): {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(state).__name__}, expected a dict")
    if expected_config is not None:
        saved = state.get("config")
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"checkpoint {p} holds no 'config' to check against")
        if dataclasses.is_dataclass(expected_config):  # keys moved since it was written: compare at the new place
            from dsrna_dist.config import upgrade_dict

            saved = upgrade_dict(type(expected_config), saved)
        errors, warnings = compare_configs(saved, _as_dict(expected_config), structural=structural,
                                           harmless=harmless, strict=strict)
        if errors:
            key, a, b = errors[0]
            more = f" (and {len(errors) - 1} more: {', '.join(k for k, _, _ in errors[1:4])})" \
                if len(errors) > 1 else ""
            raise CheckpointError(f"checkpoint {p} was written with a different config: key {key!r} "
                                  f"is {_fmt(a)} there but {_fmt(b)} now{more}; use a new run.name "
                                  f"or run.resume=false")
        for key, a, b in warnings:
            log.warning("resuming %s with changed key %r: %s -> %s", p, key, _fmt(a), _fmt(b))
    return state
