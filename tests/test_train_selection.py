"""Model selection without the test set (issue #12.1) and the non-finite guard (issue #14).

best.pt is chosen on a held-out split of the training set: a run whose *test* labels are
garbage must produce the bitwise-same best.pt weights; a resume with a different split is
refused; a NaN/inf loss or gradient stops every rank together with the last good checkpoint
byte-identical and no NaN in metrics.jsonl.
"""
import json
import math

import numpy as np
import pytest
import torch

from dsrna_dist.config import ConfigError, TrainConfig, load_config
from dsrna_dist.training import holdout_split
from dsrna_dist.training.split import check_resume

from test_train import cli, load, metrics, torchrun, write_cfg

torch.set_num_threads(1)


def test_holdout_split_is_seeded_disjoint_and_complete():
    tr, va, rec = holdout_split(1000, 100, 7)
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(1000))
    tr2, va2, rec2 = holdout_split(1000, 100, 7)
    assert np.array_equal(va, va2) and rec == rec2
    _, va3, rec3 = holdout_split(1000, 100, 8)
    assert not np.array_equal(va, va3) and rec3.digest != rec.digest
    # not the first rows: a class-sorted file must not lose whole classes to validation
    assert va.max() > 500 and va.min() < 500
    assert check_resume(rec.to_dict(), rec, "x") is None
    assert "val_size" in check_resume(rec.to_dict(), holdout_split(1000, 50, 7)[2], "x")
    assert "val_seed" in check_resume(rec.to_dict(), rec3, "x")
    with pytest.raises(ConfigError, match="data.val_size"):
        holdout_split(100, 100, 0)


def _garbage_test_labels(monkeypatch):
    """The test split's labels replaced by a seeded permutation plus a shift (garbage)."""
    import dsrna_dist.data.build as build

    real = build.load_arrays

    def fake(cfg, split):
        a = real(cfg, split)
        if split == "test":
            g = torch.Generator().manual_seed(123)
            labels = (a.labels[torch.randperm(len(a.labels), generator=g)] + 3) % 10
            a = type(a)(a.images, labels, a.info)
        return a

    monkeypatch.setattr(build, "load_arrays", fake)


def test_best_checkpoint_does_not_depend_on_test_labels(tmp_path, monkeypatch):
    from dsrna_dist.train import train

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    over = {"data.synthetic_size": 192, "data.val_size": 64, "epochs": 3, "model.drop_path": 0.0}
    a = load_config(TrainConfig, str(write_cfg(tmp_path / "a")), over)
    assert train(a) == 0
    _garbage_test_labels(monkeypatch)
    b = load_config(TrainConfig, str(write_cfg(tmp_path / "b")), over)
    assert train(b) == 0
    ra, rb = tmp_path / "a" / "runs" / "tiny", tmp_path / "b" / "runs" / "tiny"
    ma, mb = metrics(ra), metrics(rb)
    assert ma[-1]["test_top1"] != mb[-1]["test_top1"]  # the garbage did reach the test evaluation
    assert all("test_top1" not in r for r in ma[:-1])  # and only the final line touches the test set
    assert [r["val_top1"] for r in ma] == [r["val_top1"] for r in mb]
    ba, bb = load(ra / "checkpoints" / "best.pt"), load(rb / "checkpoints" / "best.pt")
    assert ba["epoch"] == bb["epoch"] and ba["best_top1"] == bb["best_top1"] and ba["best_metric"] == "val_top1"
    assert ba["model"].keys() == bb["model"].keys()
    for k in ba["model"]:
        assert torch.equal(ba["model"][k], bb["model"][k]), k


def test_resume_with_a_different_split_is_refused_and_nothing_touched(tmp_path):
    from dsrna_dist.train import train

    cfg = write_cfg(tmp_path, epochs=1, data={"synthetic_size": 160, "val_size": 32})
    assert train(load_config(TrainConfig, str(cfg))) == 0
    run = tmp_path / "runs" / "tiny"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for args in (["--data.val_size=48"], ["--data.val_seed=1"]):
        r = cli("--config", str(cfg), "--epochs=2", *args)
        assert r.returncode == 2 and "validation split" in r.stderr, r.stderr[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.dist
def test_nonfinite_loss_stops_both_ranks_and_keeps_the_last_good_checkpoint(tmp_path):
    """The issue's probe: resume a finished 2-epoch 2-rank run with --epochs=3 --optim.lr=1e6."""
    cfg = write_cfg(tmp_path, data={"synthetic_size": 256 + 64, "val_size": 64})
    r = torchrun(cfg)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    files = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl")
    before = {f: (run / f).read_bytes() for f in files}
    r = torchrun(cfg, "--epochs=3", "--optim.lr=1e6")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "non-finite" in out and "epoch 3 step" in out and "left untouched" in out, out[-3000:]
    assert out.count("error: stopping") == 1  # rank 0 reports; rank 1 stops silently with it
    assert "dsrna_dist/train.py" not in out, out[-3000:]  # no traceback through our code (the launcher
    # itself prints a ChildFailedError for any non-zero exit: issue #14's launcher item)
    assert {f: (run / f).read_bytes() for f in files} == before
    for line in (run / "metrics.jsonl").read_text().splitlines():
        assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in json.loads(line).values())
    last = load(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.dist
@pytest.mark.parametrize("engine,stage", [
    ("deepspeed", 2),
    pytest.param("deepspeed", 0, marks=pytest.mark.slow),
    pytest.param("accelerate", 0, marks=pytest.mark.slow),
])
def test_nonfinite_gradient_with_finite_loss_stops_every_engine(tmp_path, engine, stage):
    """A NaN gradient behind a finite loss (test hook on rank 0, epoch 2): ZeRO-1/2 would skip
    that step silently and train on, ZeRO-0 would apply it. Every engine stops both ranks
    before the step, with epoch 1's checkpoint as it was."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    cfg = write_cfg(tmp_path, engine=engine, zero_stage=stage, optim={"grad_clip": 0.0})
    step = 256 // (2 * 16) + 3  # the 4th step of epoch 2
    r = torchrun(cfg, extra_env={"DSRNA_TEST_NAN_GRAD": f"0:{step}"}, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "non-finite" in out and f"epoch 2 step 4 (global step {step + 1}" in out, out[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert [row["epoch"] for row in metrics(run)] == [0]  # epoch 1 only (0-based in the log)
    last = load(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
