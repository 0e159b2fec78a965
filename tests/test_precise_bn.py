"""Precise BN (``train.precise_bn_batches``): the BN running statistics are the plain average of
the per-batch statistics, computed here independently from forward hooks on the BN inputs; the
trained weights are untouched (bit for bit those of the same run without it, also under PGD-AT,
whose attacks read the running statistics); resume stays exact; on 2 ranks the average covers
both ranks' batches."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsrna_dist.config import ConfigError
from dsrna_dist.training.precise_bn import bn_layers, bn_stats, load_bn_stats, precise_bn, precise_bn_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import ROOT, env, load, metrics, torchrun, write_cfg  # noqa: E402
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

torch.set_num_threads(1)


def reference_stats(model: nn.Module, batches) -> dict:
    """{BN index: (mean, unbiased var)} averaged over ``batches``, from hooks on the BN inputs of a
    copy in train mode (its BNs use batch statistics, so no running value leaks in)."""
    net = copy.deepcopy(model).train()
    seen: dict = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out, i=i: seen.setdefault(i, []).append(inp[0].double()))
             for i, bn in enumerate(bn_layers(net))]
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    out = {}
    for i, xs in seen.items():
        per = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs]  # channels x (batch * spatial)
        out[i] = (torch.stack([p.mean(1) for p in per]).mean(0), torch.stack([p.var(1, unbiased=True) for p in per]).mean(0))
    return out


def assert_stats(model: nn.Module, ref: dict) -> None:
    bns = bn_layers(model)
    assert len(ref) == len(bns) > 0
    for i, bn in enumerate(bns):
        assert torch.allclose(bn.running_mean.double(), ref[i][0], rtol=1e-5, atol=1e-6), i
        assert torch.allclose(bn.running_var.double(), ref[i][1], rtol=1e-5, atol=1e-6), i


def small_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(4 * 9, 6),
                        nn.BatchNorm1d(6, momentum=0.3))
    with torch.no_grad():
        for bn in bn_layers(net):  # stale EMA values, far from the data's
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(0.01)
            bn.num_batches_tracked.fill_(17)
            if bn.affine:
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-1.0, 1.0)
    return net


# --------------------------------------------------------------------------- the function
def test_precise_bn_is_the_average_of_batch_statistics_and_keeps_everything_else():
    net = small_net().eval()
    params = {k: v.clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 2, 5, 5, generator=g) * 3 - 1 for _ in range(5)]
    ref = reference_stats(net, batches)
    assert precise_bn(net, iter(batches)) == 5
    assert_stats(net, ref)
    assert not net.training  # the mode it came in
    assert [bn.momentum for bn in bn_layers(net)] == [0.1, 0.1, 0.3]
    assert all(int(bn.num_batches_tracked) == 17 for bn in bn_layers(net))
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())
    # a different set of batches gives other statistics: the test above can fail
    other = reference_stats(net, batches[:2])
    assert not torch.allclose(other[0][1], ref[0][1], rtol=1e-3)


def test_precise_bn_with_no_batches_keeps_the_ema():
    net = small_net().train()
    assert precise_bn(net, iter([])) == 0
    assert all(torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 5.0)) for bn in bn_layers(net))
    assert all(torch.equal(bn.running_var, torch.full_like(bn.running_var, 0.01)) for bn in bn_layers(net))
    assert net.training


def test_indices_are_seeded_whole_batches_per_rank_from_the_pool_only():
    pool = np.arange(1000)[::3]  # e.g. what a held-out split leaves: 334 positions
    a = precise_bn_indices(pool, batches=7, batch_size=16, world_size=2, seed=4)
    assert len(a) == 96 and len(a) % (16 * 2) == 0  # 7 batches over 2 ranks -> 3 each
    assert np.all(np.diff(a) > 0) and set(a.tolist()) <= set(pool.tolist())
    assert np.array_equal(a, precise_bn_indices(pool, 7, 16, 2, 4))
    assert not np.array_equal(a, precise_bn_indices(pool, 7, 16, 2, 5))
    assert len(precise_bn_indices(pool, 100, 16, 1, 4)) == 320  # capped by the pool, whole batches
    with pytest.raises(ConfigError, match="precise_bn_batches.*fewer than one batch"):
        precise_bn_indices(pool[:20], 4, 16, 2, 0)
    with pytest.raises(ConfigError, match="precise_bn_batches.*cannot give each of the 2 ranks"):
        precise_bn_indices(pool, 1, 16, 2, 0)


def test_bn_stats_copy_and_restore():
    net = small_net()
    saved = bn_stats(net)
    assert sorted(saved) == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var",
                             "7.running_mean", "7.running_var"]
    precise_bn(net, iter([torch.rand(8, 2, 5, 5)]))
    assert not torch.equal(net[1].running_var, saved["1.running_var"])
    load_bn_stats(net, saved)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    saved["1.running_var"].fill_(7.0)  # a copy, not a view
    assert not torch.equal(net[1].running_var, saved["1.running_var"])


# --------------------------------------------------------------------------- in train
def _bn_loader_batches(cfg, rank: int, world: int):
    from dataclasses import replace

    from dsrna_dist.data import build_eval_loader
    from dsrna_dist.train import resolve_precise_bn, resolve_split

    train_idx, _, _ = resolve_split(cfg)
    idx = resolve_precise_bn(cfg, train_idx, cfg.data.synthetic_size, world)
    loader = build_eval_loader(replace(cfg.data, eval_batch_size=cfg.data.batch_size), rank, world,
                               torch.device("cpu"), cfg.run.seed, indices=idx, split="train")
    return [x for x, _ in loader]


def _train(cfg: Path, extra_env=None) -> subprocess.CompletedProcess:
    return run_proc([sys.executable, "-m", "dsrna_dist.train", "--config", str(cfg)], cwd=ROOT,
                    env=env(**(extra_env or {})), timeout=300)


def _is_bn_stat(key: str, model: dict) -> bool:
    return key.endswith(("running_mean", "running_var")) and key.rsplit(".", 1)[0] + ".num_batches_tracked" in model


def test_train_precise_bn_statistics_weights_and_resume(tmp_path):
    """Under PGD-AT with its attacks in eval mode (they read the running statistics), so the
    weights can only match the run without precise BN if training keeps its own EMA."""
    from dsrna_dist.config import TrainConfig, load_config
    from dsrna_dist.space.network import load_trained

    top = dict(data={"synthetic_size": 160, "val_size": 32},
               regime={"name": "pgd_at", "eps": 0.1, "steps": 2, "step_size": 0.05, "attack_bn": "eval"})
    for d in ("on", "off", "again"):
        (tmp_path / d).mkdir()
    on = write_cfg(tmp_path / "on", **top, precise_bn_batches=5)
    off = write_cfg(tmp_path / "off", **top)
    for c in (on, off):
        r = _train(c)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_on, run_off = tmp_path / "on" / "runs" / "tiny", tmp_path / "off" / "runs" / "tiny"
    ck = load(run_on / "checkpoints" / "last.pt")
    a, b = ck["model"], load(run_off / "checkpoints" / "last.pt")["model"]
    stats = [k for k in a if _is_bn_stat(k, a)]
    assert stats and a.keys() == b.keys() and sorted(ck["bn_ema"]) == sorted(stats)
    # weights (and every other buffer) bit for bit those of the run without precise BN, and the
    # training EMA kept beside them is that run's statistics
    assert all(torch.equal(a[k], b[k]) for k in a if k not in stats)
    assert all(torch.equal(ck["bn_ema"][k], b[k]) for k in stats)
    assert any(not torch.equal(a[k], b[k]) for k in stats)
    # the saved statistics are the average over the configured training batches, final weights
    model, cfg, _ = load_trained(str(run_on / "checkpoints" / "last.pt"))
    assert cfg == load_config(TrainConfig, str(on), {})
    batches = _bn_loader_batches(cfg, 0, 1)
    assert len(batches) == 5 and all(x.shape[0] == 16 for x in batches)
    assert_stats(model, reference_stats(model, batches))
    rows, rows_off = metrics(run_on), metrics(run_off)
    assert all("val_top1_ema" in r and r["precise_bn_s"] > 0 for r in rows)
    assert not any("val_top1_ema" in r for r in rows_off)
    assert [r["val_top1_ema"] for r in rows] == [r["val_top1"] for r in rows_off]  # the EMA's own score
    best = load(run_on / "checkpoints" / "best.pt")  # selected on the precise-BN validation score
    assert best["best_top1"] == max(r["val_top1"] for r in rows)
    # killed in the 2nd epoch (after a precise-BN checkpoint), relaunched: the same run
    again = write_cfg(tmp_path / "again", **top, precise_bn_batches=5)
    steps = (160 - 32) // 16
    r = _train(again, {"DSRNA_TEST_CRASH": f"0:{steps + 3}"})
    assert r.returncode != 0 and f"exiting at step {steps + 3}" in r.stdout + r.stderr
    r = _train(again)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-2000:]
    c = load(tmp_path / "again" / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], c["model"][k]) for k in a)
    assert all(torch.equal(ck["bn_ema"][k], c["bn_ema"][k]) for k in stats)
    keys = ("train_loss", "val_top1_ema", "val_top1", "test_top1")
    assert [[r.get(k) for k in keys] for r in metrics(tmp_path / "again" / "runs" / "tiny")] == \
        [[r.get(k) for k in keys] for r in rows]


@pytest.mark.dist
def test_two_ranks_average_both_ranks_batches(tmp_path):
    from dsrna_dist.space.network import load_trained

    cfg = write_cfg(tmp_path, precise_bn_batches=6)
    r = torchrun(cfg, extra_env={"DSRNA_TEST_DUMP_DIR": tmp_path / "dump"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = load(tmp_path / "dump" / "rank0.pt")["model"], load(tmp_path / "dump" / "rank1.pt")["model"]
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    model, tcfg, _ = load_trained(str(last))
    ema = load(last)["bn_ema"]  # what the ranks train on after the checkpoint: their own EMA
    assert ema and all(torch.equal(v, ema[k] if k in ema else r0[k]) for k, v in r0.items())
    assert all(torch.equal(v, r0[k]) for k, v in model.state_dict().items() if k not in ema)
    per_rank = [_bn_loader_batches(tcfg, rank, 2) for rank in (0, 1)]
    assert [len(p) for p in per_rank] == [3, 3]
    assert_stats(model, reference_stats(model, per_rank[0] + per_rank[1]))
    # one rank's batches alone give other statistics: the average really spans both ranks
    alone = reference_stats(model, per_rank[0])
    assert not torch.allclose(alone[0][1], reference_stats(model, per_rank[0] + per_rank[1])[0][1], rtol=1e-4)
