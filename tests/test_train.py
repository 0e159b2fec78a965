"""Retraining: schedules vs torch's own, a real run end to end, resume after a killed rank,
DDP and DeepSpeed ZeRO-2 with 2 real processes, bad input refused before anything is written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsrna_dist.config import OptimConfig, TrainConfig, load_config
from dsrna_dist.engine.schedule import lr_at
from dsrna_dist.train import effective_lr
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A tiny run: 1x16x16 synthetic images, a 3-cell C=4 network with aux head, drop-path on.
TINY = {
    "run": {"name": "tiny", "seed": 3, "progress": False, "log_every": 2},
    "data": {"name": "synthetic", "synthetic_shape": [1, 16, 16], "synthetic_size": 256,
             "synthetic_test_size": 96, "batch_size": 16, "eval_batch_size": 48, "cutout": 0,
             "crop_padding": 2},
    "model": {"genotype": "DARTS_V2", "init_channels": 4, "layers": 3, "drop_path": 0.3},
    "optim": {"lr": 0.05},
    "epochs": 2,
}
STEPS_PER_EPOCH_2R = 256 // (2 * 16)


def write_cfg(tmp_path: Path, name: str = "tiny.yaml", **top) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for k, v in top.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun(cfg: Path, *args: str, nproc: int = 2, timeout: int = 240, extra_env=None,
             launcher_args=()) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *launcher_args, "-m", "dsrna_dist.train", "--config", str(cfg), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True,
                          text=True, timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- schedules
def test_schedules_match_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    o = OptimConfig(lr=0.025, lr_min=0.001, schedule="cosine")
    opt = torch.optim.SGD([p], lr=0.025)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=600, eta_min=0.001)
    for epoch in range(600):
        assert lr_at(o, epoch, 3, 10, 600, base_lr=0.025) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    o = OptimConfig(lr=0.5, schedule="step", step_size=1, step_gamma=0.97)
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.97)
    for epoch in range(250):
        assert lr_at(o, epoch, 0, 10, 250, base_lr=0.5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    w = OptimConfig(lr=0.4, schedule="step", warmup_epochs=2)
    ramp = [lr_at(w, e, s, 5, 10, base_lr=0.4) for e in range(2) for s in range(5)]
    assert ramp == pytest.approx([0.4 * (i + 1) / 10 for i in range(10)])
    assert lr_at(w, 2, 0, 5, 10, base_lr=0.4) == pytest.approx(0.4 * 0.97 ** 2)


def test_linear_lr_scaling_rule():
    cfg = load_config(TrainConfig, overrides={"optim.lr": 0.1, "data.batch_size": 128,
                                              "base_batch_size": 256, "scale_lr": True})
    assert effective_lr(cfg, 8) == pytest.approx(0.1 * 8 * 128 / 256)
    assert effective_lr(load_config(TrainConfig, overrides={"optim.lr": 0.1}), 8) == 0.1


def test_recipes_load():
    for name in ("cifar10", "mnist", "fashion_mnist", "imagenet", "fmnist_tiny", "fmnist_tiny_deepspeed"):
        c = load_config(TrainConfig, str(ROOT / "configs" / "train" / f"{name}.yaml"))
        assert c.model.auxiliary and c.model.auxiliary_weight == 0.4
    c = load_config(TrainConfig, str(ROOT / "configs/train/cifar10.yaml"))
    assert (c.epochs, c.data.batch_size, c.optim.lr, c.optim.weight_decay, c.data.cutout,
            c.model.init_channels, c.model.layers, c.model.drop_path) == (600, 128, 0.025, 3e-4, 16, 36, 20, 0.3)
    assert load_config(TrainConfig, str(ROOT / "configs/train/mnist.yaml")).data.cutout == 0
    c = load_config(TrainConfig, str(ROOT / "configs/train/imagenet.yaml"))
    assert (c.epochs, c.model.layers, c.model.init_channels, c.optim.lr, c.optim.step_gamma,
            c.optim.weight_decay, c.optim.label_smoothing, c.data.loader) == (250, 14, 48, 0.5, 0.97, 3e-5, 0.1, "ffcv")


def test_deepspeed_config_and_documented_example():
    from dsrna_dist.engine.deepspeed_engine import ds_config

    c = ds_config(micro_batch=32, world_size=4, zero_stage=1, grad_clip=0.0)
    assert c["train_batch_size"] == 128 and c["zero_optimization"]["stage"] == 1
    # 0 = off, as optim.grad_clip, read by DeepSpeed's own parser: with the key left out,
    # DeepSpeed 0.19 clips at its default 1.0 (what this config did until the thirteenth session)
    ds = pytest.importorskip("deepspeed.runtime.config")
    for clip in (0.0, 5.0):
        assert ds.DeepSpeedConfig(ds_config(micro_batch=32, world_size=1, zero_stage=2,
                                            grad_clip=clip)).gradient_clipping == clip
    example = json.loads((ROOT / "launch/deepspeed/zero2_example.json").read_text())
    # the CIFAR-10 recipe: DARTS_V2, C=36, 20 cells, with its aux head: 3,825,768 parameters
    assert ds_config(micro_batch=128, world_size=8, zero_stage=2, grad_clip=5.0,
                     num_parameters=3_825_768) == example
    parsed = ds.DeepSpeedConfig({**example, "train_batch_size": 128})  # parsed in a 1-process world
    assert parsed.zero_config.reduce_bucket_size == parsed.zero_config.allgather_bucket_size == 3_825_768
    # bf16: DeepSpeed's own autocast section, fp32 gradients on the wire (no lower-precision modules)
    bf = ds.DeepSpeedConfig(ds_config(micro_batch=32, world_size=1, zero_stage=2, grad_clip=0.0,
                                      autocast_bf16=True))
    assert bf.torch_autocast_enabled and bf.torch_autocast_dtype == torch.bfloat16
    assert bf.torch_autocast_lower_precision_safe_modules == [] and not bf.bfloat16_config.enabled


# --------------------------------------------------------------------------- single process
def test_single_process_run_checkpoint_and_load_trained(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsrna_dist.space.network import load_trained
    from dsrna_dist.train import train

    cfg = load_config(TrainConfig, str(write_cfg(tmp_path)), {"data.synthetic_size": 160, "data.val_size": 32})
    assert train(cfg) == 0
    run = tmp_path / "runs" / "tiny"
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["drop_prob"] == pytest.approx(0.15)
    for key in ("train_loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr",
                "img_per_s", "epoch_time_s", "max_rss_mb"):
        assert all(key in r for r in rows), key
    # the test set is touched by the final epoch's line only; selection is on the held-out split
    assert "test_top1" not in rows[0] and rows[1]["test_n"] == 96 and rows[0]["val_n"] == 32
    assert rows[1]["lr"] == pytest.approx(0.001 + 0.5 * (0.05 - 0.001) * (1 + math.cos(math.pi / 2)))
    ckpt = load(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["dataset"] == "synthetic" and ckpt["config"]["epochs"] == 2
    assert ckpt["val_split"]["size"] == 32 and ckpt["val_split"]["n_train"] == 160
    best = load(run / "checkpoints" / "best.pt")
    assert best["metrics"]["val_top1"] == max(r["val_top1"] for r in rows) == best["best_top1"]
    summary = json.loads((run / "summary.json").read_text())  # the light record of a finished run
    assert summary["best_top1"] == best["best_top1"] and summary["test_top1"] == rows[-1]["test_top1"]
    assert summary["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in rows), abs=0.1)

    # load_trained rebuilds the same network and reproduces the run's test accuracy.
    model, tcfg, g = load_trained(str(run / "checkpoints" / "last.pt"), "cpu")
    assert not model.training and tcfg == cfg and g.to_dict() == ckpt["genotype"]
    from dsrna_dist.data import build_eval_loader
    correct = n = 0
    with torch.no_grad():
        for x, y in build_eval_loader(cfg.data, 0, 1, torch.device("cpu"), cfg.run.seed):
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    assert n == 96 and 100 * correct / n == pytest.approx(rows[-1]["test_top1"])

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/top1", "train/top5", "val/top1", "test/top1", "test/top5", "lr",
            "perf/img_per_s", "perf/epoch_time_s", "perf/max_rss_mb"} <= tags, tags
    assert len(ea.Scalars("train/loss")) == 2


# --------------------------------------------------------------------------- CLI / bad input
def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return run_proc([PY, "-m", "dsrna_dist.train", *args], cwd=ROOT, env=env(), timeout=timeout)


def test_help_is_real_help():
    r = cli("--help")
    assert r.returncode == 0 and "--model.genotype" in r.stdout and "--zero_stage" in r.stdout


@pytest.mark.parametrize("override,needle", [
    ({"optim.lrr": 0.1}, "unknown key 'optim.lrr'"),
    ({"engine": "horovod"}, "'engine'"),
    ({"model.genotype": "NOT_A_GENOTYPE"}, "NOT_A_GENOTYPE"),
    ({"model.nodes": 3}, "expects 3"),
    ({"model.layers": 2}, "at least 3 cells"),
    ({"data.synthetic_shape": [1, 18, 18], "model.layers": 6}, "odd 9x9"),
    ({"engine": "deepspeed", "dist.compile": True}, "'dist.compile'"),
    ({"precise_bn_batches": -1}, "precise_bn_batches"),
    ({"precise_bn_batches": 4, "data.synthetic_size": 12}, "'precise_bn_batches': 12 training images"),
])
def test_bad_input_fails_before_writing(tmp_path, capsys, override, needle):
    from dsrna_dist.train import main

    with pytest.raises(SystemExit) as e:  # the CLI entry, in-process (the subprocess path: below)
        main(["--config", str(write_cfg(tmp_path))] + [f"--{k}={json.dumps(v)}" for k, v in override.items()])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_corrupt_checkpoint_is_refused_and_nothing_touched(tmp_path):
    cfg = write_cfg(tmp_path)
    ckdir = tmp_path / "runs" / "tiny" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / "last.pt").write_bytes(b"\x80\x04 not a checkpoint")
    (ckdir / "best.pt").write_bytes(b"an older best")
    (tmp_path / "runs" / "tiny" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    r = cli("--config", str(cfg))
    assert r.returncode == 2
    assert "last.pt" in r.stderr and "corrupt" in r.stderr, r.stderr
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before


# --------------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-rank DDP run; every rank dumps its final weights."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = write_cfg(tmp)
    r = torchrun(cfg, extra_env={"DSRNA_TEST_DUMP_DIR": tmp / "dump"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, cfg


@pytest.fixture(scope="module")
def ddp_run_contiguous(tmp_path_factory):
    """The same 2-rank DDP run in the contiguous layout (the one DeepSpeed trains in: its
    broadcast views parameters as bytes) and without gradient clipping, so ZeRO is compared with
    DDP like for like. Why no clipping: the two norms differ in float summation order (2e-7 at
    the first step), and this tiny run at lr 0.05 amplifies that ~10x per step while the clip is
    active (1e-4 after 8 steps, 8e-3 after 16). Unclipped, ZeRO-2 and DDP agree to 1e-6 here.
    DeepSpeed's clipping value is checked by ``test_deepspeed_config_and_documented_example``."""
    tmp = tmp_path_factory.mktemp("ddp_contiguous")
    r = torchrun(write_cfg(tmp, dist={"channels_last": False}, optim={"grad_clip": 0.0}))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp


def _assert_ranks_identical(dump: Path):
    r0, r1 = load(dump / "rank0.pt"), load(dump / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2 and r0["rank"] == 0 and r1["rank"] == 1
    assert r0["model"].keys() == r1["model"].keys()
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    return r0["model"]


@pytest.mark.dist
def test_ddp_two_ranks_identical_weights(ddp_run):
    tmp, _ = ddp_run
    weights = _assert_ranks_identical(tmp / "dump")
    run = tmp / "runs" / "tiny"
    rows = metrics(run)
    assert [r["world_size"] for r in rows] == [2, 2] and rows[-1]["step"] == 2 * STEPS_PER_EPOCH_2R
    last = load(run / "checkpoints" / "last.pt")
    assert all(torch.equal(last["model"][k], weights[k]) for k in weights)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] or rows[-1]["test_top1"] > 10.0


@pytest.mark.dist
def test_killed_rank_then_relaunch_reaches_the_same_weights(ddp_run, tmp_path):
    ref_tmp, _ = ddp_run
    cfg = write_cfg(tmp_path)
    crash_step = STEPS_PER_EPOCH_2R + 3  # in the middle of the 2nd epoch
    r = torchrun(cfg, extra_env={"DSRNA_TEST_CRASH": f"1:{crash_step}"})
    assert r.returncode != 0 and f"exiting at step {crash_step}" in r.stdout + r.stderr
    run = tmp_path / "runs" / "tiny"
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1
    r = torchrun(cfg)  # the very same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    got = load(run / "checkpoints" / "last.pt")
    ref = load(ref_tmp / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert got["epoch"] == ref["epoch"] == 2 and got["step"] == ref["step"]
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), k
    for a, b in zip(got["optimizers"]["model"]["state"].values(), ref["optimizers"]["model"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["test_top1"] == metrics(ref_tmp / "runs" / "tiny")[1]["test_top1"]


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_max_restarts_resumes(ddp_run, tmp_path):
    ref_tmp, _ = ddp_run
    cfg = write_cfg(tmp_path)
    r = torchrun(cfg, extra_env={"DSRNA_TEST_CRASH": f"1:{STEPS_PER_EPOCH_2R + 2}"},
                 launcher_args=("--max-restarts", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    ref = load(ref_tmp / "runs" / "tiny" / "checkpoints" / "last.pt")
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), k


@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_deepspeed_zero_two_ranks(ddp_run_contiguous, tmp_path, stage):
    pytest.importorskip("deepspeed")
    cfg = write_cfg(tmp_path, engine="deepspeed", zero_stage=stage, optim={"grad_clip": 0.0})
    r = torchrun(cfg, extra_env={"DSRNA_TEST_DUMP_DIR": tmp_path / "dump"}, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    weights = _assert_ranks_identical(tmp_path / "dump")
    rows = metrics(tmp_path / "runs" / "tiny")
    assert [r["world_size"] for r in rows] == [2, 2]
    # ZeRO computes the same SGD as DDP (grads averaged, partitioned step):
    # an independent implementation of the same update, equal up to float summation order.
    ref = load(ddp_run_contiguous / "runs" / "tiny" / "checkpoints" / "last.pt")["model"]
    for k, v in ref.items():
        if v.is_floating_point():
            d = (weights[k] - v).abs()
            assert torch.allclose(weights[k], v, rtol=1e-4, atol=1e-5), \
                (k, float(d.max()), float((d / v.abs().clamp(min=1e-12)).max()))
    ck = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert len(ck["ds_optimizer"]) == 2 and ck["config"]["engine"] == "deepspeed"


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_resume_after_kill(tmp_path):
    pytest.importorskip("deepspeed")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a = write_cfg(a, engine="deepspeed", zero_stage=2)
    cfg_b = write_cfg(b, engine="deepspeed", zero_stage=2)
    assert torchrun(cfg_a, timeout=400).returncode == 0
    r = torchrun(cfg_b, extra_env={"DSRNA_TEST_CRASH": f"0:{STEPS_PER_EPOCH_2R + 1}"}, timeout=400)
    assert r.returncode != 0
    assert torchrun(cfg_b, timeout=400).returncode == 0
    ref = load(a / "runs" / "tiny" / "checkpoints" / "last.pt")
    got = load(b / "runs" / "tiny" / "checkpoints" / "last.pt")
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), k


def test_resumed_optimizer_keeps_the_configs_settings_and_the_saved_state():
    """torch's load_state_dict would bring back the checkpoint's momentum / weight decay /
    nesterov / betas, while the resume check logs those keys as changed to the new values."""
    from dsrna_dist.engine.checkpoint import load_optimizer_state

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    old = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=3e-4)
    w.grad = torch.randn(5)
    old.step()
    adam_old = torch.optim.Adam([w], lr=0.1, betas=(0.5, 0.999), weight_decay=1e-3)
    adam_old.step()
    new = torch.optim.SGD([w], lr=0.2, momentum=0.5, weight_decay=5e-4, nesterov=True)
    load_optimizer_state(new, old.state_dict())
    g = new.param_groups[0]
    # the lr is the schedule's: it comes back from the checkpoint (a torch scheduler relies on that)
    assert (g["momentum"], g["weight_decay"], g["nesterov"], g["lr"]) == (0.5, 5e-4, True, 0.1)
    assert torch.equal(new.state[w]["momentum_buffer"], old.state[w]["momentum_buffer"])
    adam_new = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    load_optimizer_state(adam_new, adam_old.state_dict())
    assert adam_new.param_groups[0]["betas"] == (0.9, 0.99) and adam_new.param_groups[0]["weight_decay"] == 0.0
    assert torch.equal(adam_new.state[w]["exp_avg"], adam_old.state[w]["exp_avg"])
    assert float(adam_new.state[w]["step"]) == 1.0
