"""The one place that turns a stage config into a running (possibly distributed) process.

The same stage code runs as 1 CPU process (``python -m``), N gloo CPU processes
(``torchrun --standalone --nproc_per_node N -m`` or ``accelerate launch --multi_gpu
--num_processes N ... -m``) and N GPUs with NCCL; :func:`setup_runtime` hides the difference.
:func:`run_stage` adds the failure policy: one clear error line, a non-zero exit, no hang.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

from .checkpoint import CheckpointManager
from .errors import CheckpointError, is_user_error, user_message
from .io import atomic_write_text, remove_stale_temps
from .logs import close_logging, setup_logging
from .procgroup import init_process_group_from_env, launched_distributed, resolve_backend
from .seeding import derive_seed, rank_generator, seed_everything, set_deterministic
from .tb import TBWriter

EXIT_USER_ERROR = 2
EXIT_BUG = 1
# gloo/NCCL messages that mean "another rank died": a consequence, not the root cause
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "NCCL communicator was aborted", "remote process exited")


@dataclass
class Runtime:
    """Everything a stage needs to know about where and how it runs."""

    accelerator: Any
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    is_main: bool
    run_dir: Path
    tb: TBWriter
    cfg: Any
    stage: str
    seed: int
    ckpt: CheckpointManager
    log: logging.Logger = field(repr=False, default_factory=lambda: logging.getLogger("dsrna_dist"))
    started: float = field(default_factory=time.time)

    # -- logging
    def print(self, msg: str) -> None:
        """Log on rank 0 only (other ranks' INFO is filtered by level)."""
        self.log.info(msg)

    def warn(self, msg: str) -> None:
        """Warnings are shown on every rank, prefixed with the rank."""
        self.log.warning(msg)

    def progress(self, iterable: Iterable, **kw: Any) -> Iterable:
        """tqdm on rank 0 when ``run.progress``; the bare iterable elsewhere."""
        if not (self.is_main and getattr(self.cfg.run, "progress", True)):
            return iterable
        from tqdm.auto import tqdm

        kw.setdefault("dynamic_ncols", True)
        kw.setdefault("leave", False)
        return tqdm(iterable, **kw)

    # -- sync
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # -- randomness
    @property
    def rank_seed(self) -> int:
        """Seed of this rank's own stream, derived from (run.seed, rank)."""
        return derive_seed(self.seed, self.rank)

    def generator(self, stream: int = 0, device: Any = "cpu") -> torch.Generator:
        """Private generator for (run.seed, rank, stream): data order, augmentation, noise."""
        return rank_generator(self.seed, self.rank, device, stream)

    # -- checkpoints
    def maybe_resume(self, expected_config: Any = None, **kw: Any) -> Optional[dict]:
        """The latest checkpoint's state when ``run.resume`` and one exists, else None."""
        if not getattr(self.cfg.run, "resume", True):
            return None
        path = self.ckpt.latest()
        if path is None:
            return None
        expected = self.cfg if expected_config is None else expected_config
        state = self.ckpt.load(path, expected, **kw)
        self.print(f"resuming from {path} (epoch {state.get('epoch')}, step {state.get('step')})")
        return state


def memory_format(dist_cfg: Any) -> torch.memory_format:
    """The layout stages put their models in (search and train their batches too):
    channels_last unless ``dist.channels_last`` is off. DeepSpeed training keeps contiguous
    parameters, and evaluate certifies in the contiguous layout.

    On every device: measured on this project's CPU nets, channels_last (with the strided
    dil_conv as ``SubsampledConv2d``) makes an attack step 1.4-2.2x and a train step 1.7-2.3x
    cheaper than the contiguous layout (BENCHMARKS.md "CPU layout").
    """
    return torch.channels_last if dist_cfg.channels_last else torch.contiguous_format


def build_accelerator(dist_cfg: Any) -> Any:
    """Accelerator for this process; creates the restart-safe process group first if launched.

    ``cpu=not cuda`` is essential: on a GPU-less box a plain ``Accelerator()`` under
    ``accelerate launch --multi_gpu`` makes every process believe it is rank 0.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    backend = resolve_backend(dist_cfg.backend, cuda)
    timeout = timedelta(seconds=dist_cfg.timeout_s)
    # Accelerate's state is a process-wide singleton; a stale one (earlier in-process run,
    # or inherited through fork) would describe the wrong world.
    AcceleratorState._reset_state(reset_partial_state=True)
    if getattr(dist_cfg, "own_process_group", True):
        init_process_group_from_env(backend, timeout)
    handlers: list = []
    if dist.is_initialized() or launched_distributed():
        pg_backend = dist.get_backend() if dist.is_initialized() else backend
        handlers.append(InitProcessGroupKwargs(backend=pg_backend, timeout=timeout))
    if getattr(dist_cfg, "find_unused_parameters", False):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    mp = dist_cfg.mixed_precision if cuda else "no"
    # dynamo_backend "no": an `accelerate launch` config with dynamo would compile the model
    # (and turn TF32 on) behind dist.compile's back; compiling is dist.compile's job alone
    return Accelerator(cpu=not cuda, mixed_precision=mp, kwargs_handlers=handlers, dynamo_backend="no")


def _refuse_incompatible_run_dir(run_dir: Path, cfg: Any) -> None:
    """Resuming into a run dir whose config.yaml differs in a structural key is an error
    raised before config.yaml (or anything else) is overwritten."""
    import yaml

    from dsrna_dist.config import to_dict, upgrade_dict

    from .checkpoint import compare_configs
    from .errors import CheckpointError

    old_path = run_dir / "config.yaml"
    if not (getattr(cfg.run, "resume", True) and old_path.is_file()
            and (run_dir / "checkpoints" / "last.pt").is_file()):
        return
    try:
        old = yaml.safe_load(old_path.read_text())
    except (OSError, yaml.YAMLError):
        return  # unreadable: the checkpoint's own config check still applies on load
    if not isinstance(old, dict):
        return
    errors, _ = compare_configs(upgrade_dict(type(cfg), old), to_dict(cfg))
    if errors:
        key, a, b = errors[0]
        raise CheckpointError(f"{run_dir} holds a run with a different config ({old_path}): key "
                              f"{key!r} is {a!r} there but {b!r} now; use a new run.name or "
                              f"run.resume=false")


def setup_runtime(cfg: Any, stage: str) -> Runtime:
    """Process group, Accelerator, run dir + config.yaml, logging, seeds, TensorBoard."""
    from dsrna_dist.config import dump_yaml

    acc = build_accelerator(cfg.dist)
    rank, world = acc.process_index, acc.num_processes
    local_rank = acc.local_process_index
    is_main = acc.is_main_process
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    _refuse_incompatible_run_dir(run_dir, cfg)  # before anything in it is rewritten
    if is_main:
        # a kill during an atomic save left a temp file; nothing else writes here now
        stale = remove_stale_temps(run_dir, run_dir / "checkpoints", run_dir / "genotypes")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        atomic_write_text(str(run_dir / "config.yaml"), dump_yaml(cfg))
    else:
        stale = []
    log = setup_logging(rank, world, run_dir / f"{stage}.log" if is_main else None)
    if world > 1:
        dist.barrier()  # run dir exists for everyone before anyone writes into it
    set_deterministic(bool(cfg.run.deterministic))
    seed_everything(cfg.run.seed)  # identical on every rank: identical model init
    tb = TBWriter(run_dir / "tb" if getattr(cfg.run, "tensorboard", True) else None, active=is_main)
    rt = Runtime(accelerator=acc, device=acc.device, rank=rank, local_rank=local_rank,
                 world_size=world, is_main=is_main, run_dir=run_dir, tb=tb, cfg=cfg, stage=stage,
                 seed=cfg.run.seed, ckpt=CheckpointManager(run_dir, is_main=is_main), log=log)
    rt.print(f"{stage}: world_size={world} device={acc.device} backend="
             f"{dist.get_backend() if dist.is_initialized() else 'none'} "
             f"mixed_precision={acc.mixed_precision} run_dir={run_dir}")
    if stale:
        rt.print(f"removed {len(stale)} temp file(s) left by an interrupted save: "
                 + ", ".join(p.name for p in stale[:4]) + (" ..." if len(stale) > 4 else ""))
    return rt


def _flush() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass


def teardown(rt: Optional[Runtime], exit_code: int = 0, *, hard_exit: Optional[bool] = None) -> int:
    """Close writers, destroy the process group, flush; ``os._exit`` in multi-rank runs.

    Why ``os._exit``: gloo's worker threads sometimes abort (SIGABRT) during interpreter
    shutdown after a finished run (pytorch #190489), failing the launcher about 1 run in 5.
    Single-process runs return ``exit_code`` so tests and notebooks can continue.
    """
    world = rt.world_size if rt is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    if hard_exit is None:
        hard_exit = world > 1
    if rt is not None:
        rt.tb.close()
    close_logging()
    if dist.is_initialized():
        if exit_code == 0 and world > 1:
            try:  # nobody leaves while a peer may still be in a collective / using the store
                dist.barrier()
            except Exception:
                pass
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:
        pass
    _flush()
    if hard_exit:
        os._exit(exit_code)
    return exit_code


def describe_error(exc: BaseException) -> Tuple[int, str, Optional[str]]:
    """``(exit code, one-line message, traceback text or None)``; prints nothing.

    User errors (bad config, data, checkpoint, genotype, an unwritable output dir) are exit 2
    with no traceback; anything else is a bug: exit 1 with its traceback.
    """
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted", None
    if is_user_error(exc):
        return EXIT_USER_ERROR, user_message(exc), None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    lost = next((s for s in _PEER_LOST if s in text), None)
    if lost:
        text = f"lost a peer rank ({lost}); the root cause is in another rank's error above"
    return EXIT_BUG, f"{type(exc).__name__}: {text}", tb


def report_error(exc: BaseException, rank: int = 0) -> int:
    """Print the failure as one clear line (plus a traceback for bugs); return the exit code."""
    where = f" (rank {rank})" if rank else ""
    code, line, tb = describe_error(exc)
    if tb:
        print(tb, end="", file=sys.stderr)
    print(f"error{where}: {line}", file=sys.stderr)
    return code


def _current_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def run_stage(main: Callable[[Runtime], Optional[int]], cfg: Any, stage: str) -> int:
    """``setup_runtime`` -> ``main(rt)`` -> ``teardown``, with the failure policy.

    A user error (ConfigError, DataError, CheckpointError, GenotypeError) prints one line
    ``error: ...`` and exits 2; any other exception prints its traceback and one line, exit 1.
    Under a launcher the failing rank leaves with ``os._exit`` at once (no teardown that could
    block on dead peers), and the launcher stops the others. Returns the exit code only in a
    plain single process run that succeeded; otherwise exits.
    """
    rt: Optional[Runtime] = None
    try:
        rt = setup_runtime(cfg, stage)
        code = int(main(rt) or 0)
    except BaseException as exc:  # noqa: BLE001 - this is the top-level failure policy
        if isinstance(exc, SystemExit) and not exc.code:
            code = 0
        else:
            code = (int(exc.code) if isinstance(exc, SystemExit) and isinstance(exc.code, int)
                    else report_error(exc, rt.rank if rt else _current_rank()))
            multi = (rt is not None and rt.world_size > 1) or launched_distributed() or \
                (dist.is_available() and dist.is_initialized())
            _flush()
            if multi:
                os._exit(code)
            if rt is not None:
                teardown(rt, code, hard_exit=False)
            raise SystemExit(code) from None
    code = teardown(rt, code)
    if code:
        raise SystemExit(code)
    return code


def check_run_dir_writable(cfg: Any) -> None:
    """Refuse (as bad input, exit 2) an output location this process cannot write.

    Checked before anything is written: the run dir if it exists (and its ``checkpoints/`` and
    ``config.yaml``), else the nearest existing ancestor it would be created in.
    """
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run dir {run_dir} exists and is not a directory (keys 'run.out_dir', 'run.name')")
    probe = [run_dir, run_dir / "checkpoints", run_dir / "config.yaml"] if run_dir.exists() else []
    if not probe:
        anc = run_dir.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise CheckpointError(f"run dir {run_dir}: {anc} is not a directory (key 'run.out_dir')")
        probe = [anc]
    for p in probe:
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise CheckpointError(f"run dir {run_dir}: {p} is not writable (read-only output "
                                  f"location; key 'run.out_dir' = {cfg.run.out_dir!r})")


def _start_world() -> Tuple[int, int]:
    """(rank, world size) as the launcher announced them; (0, 1) for a plain process."""
    if not launched_distributed():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def agree_on_start(exc: Optional[BaseException], dist_cfg: Any = None) -> None:
    """Every rank reports how its start (config, preflight) went; exits everywhere on failure.

    Why: each rank validates the same inputs, so a bad input fails on every rank; printing it
    N times, or letting the launcher's kill of the peers race the message, hides it. Under a
    launcher the ranks meet in the process group (created here, reused by Accelerate later),
    exchange ``(code, message)``, and rank 0 alone prints ONE ``error:`` line (the lowest
    failing rank's) while every rank exits with that rank's code (2 for bad input). A bug still
    prints its traceback on the rank where it happened. A plain process just prints and exits.
    Returns only when every rank started fine.
    """
    if not launched_distributed():
        if exc is not None:
            raise SystemExit(report_error(exc, 0))
        return
    rank, _ = _start_world()
    mine = (0, "", None) if exc is None else describe_error(exc)
    if mine[2]:
        print(mine[2], end="", file=sys.stderr)  # a bug: its traceback, on its own rank
    try:
        backend = resolve_backend(getattr(dist_cfg, "backend", "auto"))
    except Exception:  # a bad dist.backend is reported by the config path; agree over the default
        backend = resolve_backend("auto")
    timeout = timedelta(seconds=int(getattr(dist_cfg, "timeout_s", 1800) or 1800))
    init_process_group_from_env(backend, timeout)
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (int(mine[0]), mine[1]))
    failed = [(r, c, m) for r, (c, m) in enumerate(outcomes) if c]
    if not failed:
        return
    r, code, msg = failed[0]
    if rank == 0:
        print(f"error{f' (rank {r})' if r else ''}: {msg}", file=sys.stderr)
    try:
        dist.barrier()  # rank 0 has printed before anyone leaves (and the launcher kills the rest)
        dist.destroy_process_group()
    except Exception:
        pass
    _flush()
    os._exit(code)


def run_checked(cfg: Any, stage: str, preflight: Callable[[Any], Any],
                main: Callable[[Runtime, Any], Optional[int]]) -> int:
    """``preflight(cfg)`` and the run-dir checks first, then :func:`run_stage` with ``main(rt, plan)``.

    Why: everything checkable without a process group (cross-key config checks, data files,
    checkpoints, genotypes, run-dir compatibility and writability) fails here with one
    ``error:`` line before any run directory or result file is touched; under a launcher the
    ranks agree first (:func:`agree_on_start`) so the line is printed once, by rank 0.
    """
    plan, failure = None, None
    try:
        if _start_world()[0] == 0:
            check_run_dir_writable(cfg)
        _refuse_incompatible_run_dir(Path(cfg.run.out_dir) / cfg.run.name, cfg)
        plan = preflight(cfg)
    except Exception as exc:  # noqa: BLE001 - reported once, exit code by error kind
        failure = exc
    agree_on_start(failure, getattr(cfg, "dist", None))
    return run_stage(lambda rt: main(rt, plan), cfg, stage)
