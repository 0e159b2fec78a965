"""The one lr schedule (``dsrna_dist.engine.schedule.lr_at``) against transcriptions of the two
schedules it replaced: the search's per-epoch ``strategies/schedule.py: lr_at(cfg, epoch, epochs)``
and the train's per-step ``train.py: lr_at(o, base_lr, epoch, step, steps_per_epoch, epochs)``
(both as of commit 5232944). Every config in configs/ is checked step by step."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from dsrna_dist.config import OptimConfig, SearchConfig, TrainConfig, load_config
from dsrna_dist.engine.schedule import lr_at
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

ROOT = Path(__file__).resolve().parents[1]
SPE = 7  # steps per epoch: any value; the per-epoch part must not depend on it


def old_search_lr(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """strategies/schedule.py at 5232944 (verbatim): one lr per epoch, warm-up per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** (epoch // cfg.step_size)
    t = epoch / max(1, epochs)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))


def old_train_lr(o: OptimConfig, base_lr: float, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """train.py at 5232944 (verbatim): per step, warm-up per step."""
    if o.warmup_epochs and epoch < o.warmup_epochs:
        done = epoch * steps_per_epoch + step + 1
        return base_lr * done / (o.warmup_epochs * max(1, steps_per_epoch))
    if o.schedule == "cosine":
        return o.lr_min + 0.5 * (base_lr - o.lr_min) * (1 + math.cos(math.pi * epoch / epochs))
    if o.schedule == "step":
        return base_lr * o.step_gamma ** (epoch // o.step_size)
    return base_lr


def lr_segments(cfg: SearchConfig):
    """(epochs of the schedule) per segment: P-DARTS restarts the schedule every stage."""
    return list(cfg.pdarts.stage_epochs) if cfg.strategy.name == "pdarts" else [cfg.epochs]


def configs(kind: str):
    return sorted((ROOT / "configs" / kind).glob("*.yaml"))


@pytest.mark.parametrize("path", configs("train"), ids=lambda p: p.name)
def test_train_lr_per_step_unchanged(path):
    cfg = load_config(TrainConfig, str(path))
    for base in (cfg.optim.lr, 3.7 * cfg.optim.lr):  # also with a scale_lr-scaled peak
        for e in range(cfg.epochs):
            for i in range(SPE):
                assert lr_at(cfg.optim, e, i, SPE, cfg.epochs, base_lr=base) == \
                    old_train_lr(cfg.optim, base, e, i, SPE, cfg.epochs), (path.name, e, i)


@pytest.mark.parametrize("path", configs("search"), ids=lambda p: p.name)
def test_search_lr_per_step_unchanged(path):
    """Exactly the old value in every step of the runs this repository has results for (fmnist_*);
    elsewhere within 4 ulp of the peak lr (measured: 300 of the 1545 epoch values of the
    search configs differ, by at most 2 ulp of the peak lr): the old search cosine rounded ``pi * (e / E)``, the unified one (torch's
    closed form, the old train's) ``(pi * e) / E``."""
    cfg = load_config(SearchConfig, str(path))
    assert cfg.optim.warmup_epochs == 0  # no search config warms up: see the warm-up test
    exact = path.name.startswith("fmnist_") or path.name.startswith("base_fmnist")
    for n in lr_segments(cfg):
        for e in range(n):
            old = old_search_lr(cfg.optim, e, n)
            for i in range(SPE):
                new = lr_at(cfg.optim, e, i, SPE, n)
                if exact:
                    assert new == old, (path.name, e, i)
                else:
                    assert abs(new - old) <= 4 * math.ulp(cfg.optim.lr), (path.name, e, i, new, old)


def test_search_warmup_now_ramps_per_step_like_train():
    """The one behaviour change, deliberate: a search with warmup_epochs > 0 used to hold
    lr * (e + 1) / (W + 1) for a whole epoch; it now ramps per step as the train always did."""
    o = OptimConfig(lr=0.1, lr_min=0.0, schedule="cosine", warmup_epochs=2)
    new = [lr_at(o, e, i, 4, 10) for e in range(2) for i in range(4)]
    assert new == [old_train_lr(o, 0.1, e, i, 4, 10) for e in range(2) for i in range(4)]
    assert new == pytest.approx([0.1 * (k + 1) / 8 for k in range(8)])
    assert new != [old_search_lr(o, e, 10) for e in range(2) for i in range(4)]
    # after the warm-up both are the same per-epoch cosine (the cosine counts the warm-up epochs)
    assert lr_at(o, 2, 3, 4, 10) == old_train_lr(o, 0.1, 2, 3, 4, 10) == \
        pytest.approx(old_search_lr(o, 2, 10), rel=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_per_epoch_part_ignores_step_and_steps_per_epoch(schedule):
    o = OptimConfig(lr=0.3, lr_min=0.01, schedule=schedule, step_size=2, step_gamma=0.5, warmup_epochs=1)
    for e in range(1, 9):
        vals = {lr_at(o, e, i, spe, 9) for spe in (1, 3, 11) for i in range(spe)}
        assert len(vals) == 1, (schedule, e, vals)


def test_search_loop_sets_the_per_step_lr(tmp_path):
    """search.py itself: with a 1-epoch warm-up over 3 steps the last step of epoch 0 runs at the
    full lr (the old per-epoch rule held lr / 2 for the whole epoch), epoch 1 at the cosine value."""
    import os
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--data.name=synthetic", "--data.synthetic_size=96", "--data.synthetic_shape=[3,8,8]",
            "--data.synthetic_classes=4", "--data.batch_size=8", "--model.init_channels=4", "--model.layers=3",
            "--model.nodes=2", "--run.progress=false", "--steps_per_epoch=3", "--epochs=2",
            "--optim.lr=0.04", "--optim.lr_min=0.0", "--optim.warmup_epochs=1", "--run.name=s",
            f"--run.out_dir={tmp_path}"]
    r = run_proc([sys.executable, "-m", "dsrna_dist.search", *args],
                 env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    ea = EventAccumulator(str(tmp_path / "s" / "tb"))
    ea.Reload()
    logged = [e.value for e in ea.Scalars("epoch/lr")]
    o = OptimConfig(lr=0.04, lr_min=0.0, warmup_epochs=1)
    assert logged == pytest.approx([lr_at(o, 0, 2, 3, 2), lr_at(o, 1, 2, 3, 2)], rel=1e-6)  # TB stores float32
    assert logged[0] == pytest.approx(0.04, rel=1e-6) and old_search_lr(o, 0, 2) == pytest.approx(0.02)
