"""A tiny stage that exercises the runtime end to end: ``python -m dsrna_dist.engine.selftest``.

Why it exists: the launch scripts and the tests need a real stage to start under torchrun /
accelerate / SLURM, train a small DDP model for a few steps, checkpoint, resume, and fail on
demand, without depending on the (heavier) search or train stages. Each rank writes
``<run_dir>/result_rank<r>.json`` with what the tests assert on.

    torchrun --standalone --nproc_per_node 2 -m dsrna_dist.engine.selftest --steps=6
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch
import yaml
from torch import nn

from dsrna_dist.config import DistConfig, RunConfig, fld, format_help, load_config

from .checkpoint import capture_rng, restore_training_state, training_state
from .errors import CheckpointError
from .io import atomic_write_json, atomic_write_text
from .runtime import Runtime, run_stage
from .seeding import seed_rank_streams
from .sync import assert_identical_across_ranks


@dataclass(frozen=True)
class SelftestConfig:
    run: RunConfig = fld(default_factory=RunConfig)
    dist: DistConfig = fld(default_factory=DistConfig)
    steps: int = fld(6, ge=1, help="optimizer steps")
    batch_size: int = fld(8, ge=1, help="per-process batch")
    width: int = fld(16, ge=1, help="hidden width")
    ckpt_every: int = fld(2, ge=0, help="save last.pt every N steps (0 = never)")
    fail_rank: int = fld(-1, ge=-1, help="rank that fails (-1 = none)")
    fail_step: int = fld(-1, ge=-1, help="step at which it fails")
    fail_mode: str = fld("raise", choices=("raise", "kill", "user_error"),
                         help="raise RuntimeError, SIGKILL itself, or raise CheckpointError")
    fail_once_marker: str = fld("", help="if set, fail only when this file is absent (it is created)")


def _sha(tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(width, 3))


def _maybe_fail(cfg: SelftestConfig, rt: Runtime, step: int) -> None:
    if rt.rank != cfg.fail_rank or step != cfg.fail_step:
        return
    if cfg.fail_once_marker:
        marker = Path(cfg.fail_once_marker)
        if marker.exists():
            return
        atomic_write_text(str(marker), f"{time.time()}\n")
    atomic_write_text(str(rt.run_dir / "failed_at.txt"), f"{time.time()}\n")
    sys.stdout.flush()
    if cfg.fail_mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.fail_mode == "user_error":
        raise CheckpointError(f"selftest: injected user error on rank {rt.rank}")
    raise RuntimeError(f"selftest: injected failure on rank {rt.rank} at step {step}")


def main(rt: Runtime, cfg: SelftestConfig) -> int:
    model = _model(cfg.width)  # same init on every rank (seeded identically by setup_runtime)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model, opt = rt.accelerator.prepare(model, opt)
    start = 0
    state = rt.maybe_resume(cfg)
    if state is not None:
        start, _ = restore_training_state(state, models={"model": model}, optimizers={"opt": opt},
                                          schedulers={"sched": sched})
    else:
        seed_rank_streams(cfg.run.seed, rt.rank)  # per-rank data / dropout streams from here on
    w_true = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 24.0
    losses, first_batch = [], None
    model.train()
    for step in rt.progress(range(start, cfg.steps), desc="selftest"):
        x = torch.randn(cfg.batch_size, 8)  # drawn from this rank's stream
        y = (x @ w_true).argmax(1)
        if first_batch is None:
            first_batch = _sha([x])
        _maybe_fail(cfg, rt, step)
        loss = nn.functional.cross_entropy(model(x.to(rt.device)), y.to(rt.device))
        opt.zero_grad(set_to_none=True)
        rt.accelerator.backward(loss)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        rt.tb.scalar("selftest/loss", loss, step)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            st = training_state(models={"model": model}, optimizers={"opt": opt},
                                schedulers={"sched": sched}, step=step + 1, config=cfg,
                                rng=capture_rng())
            rt.ckpt.save(st)
    params = [p for p in model.parameters()]
    result: Dict[str, Any] = {
        "rank": rt.rank, "world_size": rt.world_size, "start_step": start,
        "identical": assert_identical_across_ranks(params), "param_sha": _sha(params),
        "init_trained": start < cfg.steps, "first_batch_sha": first_batch, "losses": losses,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    }
    atomic_write_json(str(rt.run_dir / f"result_rank{rt.rank}.json"), result)
    rt.print(f"selftest done: world_size={rt.world_size} identical={result['identical']}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``--key=value`` overrides only (no YAML); bad keys -> one error line, exit 2."""
    overrides: Dict[str, Any] = {"run.name": "selftest", "run.progress": False}
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        print(format_help(SelftestConfig, "python -m dsrna_dist.engine.selftest", __doc__ or ""))
        return 0
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            print(f"error: expected --key=value, got {a!r}", file=sys.stderr)
            raise SystemExit(2)
        k, v = a[2:].split("=", 1)
        overrides[k] = yaml.safe_load(v) if v else v  # "3" -> 3, "true" -> True, like fire
    try:
        cfg = load_config(SelftestConfig, None, overrides)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return run_stage(lambda rt: main(rt, cfg), cfg, "selftest")


if __name__ == "__main__":
    cli()
