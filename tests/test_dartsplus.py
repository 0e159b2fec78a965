"""DARTS+ early stopping on constructed alpha histories, and in the search stage."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from dsrna_dist.config import SearchConfig, StoppingConfig
from dsrna_dist.space.supernet import derive_genotype, num_edges
from dsrna_dist.strategies.dartsplus import DartsPlusStopping, edge_rankings, is_learnable
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

PRIMS = SearchConfig().model.primitives
NODES = 4
E = num_edges(NODES)
LEARNABLE = [k for k, p in enumerate(PRIMS) if p.startswith(("sep_conv", "dil_conv"))]


def genotype_of(w):
    return derive_genotype(w, w, PRIMS, NODES)


def np_rank(w, cols):
    """Independent ranking: numpy stable argsort of -w over the ranked columns."""
    sub = w[:, cols]
    return [[cols[i] for i in np.argsort(-row, kind="stable")] for row in sub]


def test_learnable_ops_are_the_ones_with_weights():
    assert [k for k, p in enumerate(PRIMS) if is_learnable(p)] == LEARNABLE


def constructed_history(seed, stable_from, epochs):
    """Softmax-like weights whose learnable-op ranking changes every epoch before
    ``stable_from`` and then stays fixed while every value keeps moving; the parameter-free
    ops are reshuffled every epoch (they must not matter for rank_ops=learnable)."""
    g = np.random.default_rng(seed)
    hist = []
    base = g.random((E, len(PRIMS)))
    for t in range(epochs):
        w = base.copy() if t >= stable_from else g.random((E, len(PRIMS)))
        w[:, LEARNABLE] = w[:, LEARNABLE] + 0.001 * t  # values move, order kept
        w[:, [1, 2, 3]] = g.random((E, 3)) * 0.1  # pools/skip reshuffled, kept weak
        hist.append(w)
    return hist


@pytest.mark.parametrize("patience,stable_from", [(3, 4), (5, 2), (2, 0)])
def test_criterion_2_stops_when_the_ranking_was_stable_for_patience_epochs(patience, stable_from):
    hist = constructed_history(patience, stable_from, 15)
    rule = DartsPlusStopping(StoppingConfig(name="dartsplus", patience=patience, max_skip=9))
    stopped_at = None
    for t, w in enumerate(hist):
        if rule.observe(t, {"normal": torch.tensor(w), "reduce": torch.tensor(w)}, PRIMS,
                        genotype_of(torch.tensor(w))):
            stopped_at = t
            break
    # independent count of consecutive unchanged rankings
    ranks = [np_rank(w, LEARNABLE) * 2 for w in hist]
    run, expect = 0, None
    for t in range(1, len(hist)):
        run = run + 1 if ranks[t] == ranks[t - 1] else 0
        if run >= patience:
            expect = t
            break
    assert expect is not None and stopped_at == expect
    assert "criterion 2" in rule.reason and f"epoch {expect}" in rule.reason
    # with every op ranked, the reshuffled pools/skip keep resetting the count: no stop
    rule_all = DartsPlusStopping(StoppingConfig(name="dartsplus", patience=patience, max_skip=9, rank_ops="all"))
    assert not any(rule_all.observe(t, {"normal": torch.tensor(w), "reduce": torch.tensor(w)}, PRIMS, None)
                   for t, w in enumerate(hist))


def test_edge_rankings_match_numpy():
    w = torch.rand(E, len(PRIMS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = torch.rand(E, len(PRIMS), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert edge_rankings({"normal": w, "reduce": r}, PRIMS) == np_rank(w.numpy(), LEARNABLE) + np_rank(
        r.numpy(), LEARNABLE)


def test_criterion_1_two_skips_in_the_normal_cell():
    g = torch.Generator().manual_seed(4)
    rule = DartsPlusStopping(StoppingConfig(name="dartsplus", patience=100, min_epochs=3))
    sk = PRIMS.index("skip_connect")
    for t in range(6):
        w = torch.rand(E, len(PRIMS), generator=g)
        w[:, sk] = 0.0
        if t >= 1:  # from epoch 1 on, skip wins on the two strongest edges of node 0
            w[0, sk] = w[1, sk] = 5.0
        gt = genotype_of(w)
        assert (sum(op == "skip_connect" for op, _ in gt.normal) >= 2) == (t >= 1)
        reason = rule.observe(t, {"normal": w, "reduce": w}, PRIMS, gt)
        # min_epochs=3: epochs 0..1 may not stop, epoch 2 is the third epoch
        assert (reason is not None) == (t >= 2), t
    assert "criterion 1 at epoch 2" in rule.reason and "2 skip_connect" in rule.reason
    state = json.loads(json.dumps(rule.state_dict()))
    again = DartsPlusStopping(rule.cfg)
    again.load_state_dict(state)
    assert again.reason == rule.reason and again.stable == rule.stable and again.prev == rule.prev


def test_search_stage_stops_early_logs_the_reason_and_a_rerun_stays_stopped(tmp_path):
    """Any strategy: SDARTS-RS with the DARTS+ rule; alpha barely moves (tiny arch lr), so the
    ranking is stable after one epoch and the search ends at epoch 1 of 6."""
    args = ["--data.name=synthetic", "--data.synthetic_size=96", "--data.synthetic_shape=[3,8,8]",
            "--data.synthetic_classes=4", "--data.batch_size=8", "--data.crop_padding=1",
            "--model.init_channels=4", "--model.layers=3", "--model.nodes=2", "--run.progress=false",
            "--steps_per_epoch=2", "--run.tensorboard=false", "--epochs=6", "--strategy.name=sdarts_rs",
            "--stopping.name=dartsplus", "--stopping.patience=1", "--stopping.max_skip=5",
            "--arch_optim.lr=1e-9", f"--run.out_dir={tmp_path}", "--run.name=s"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = run_proc([sys.executable, "-m", "dsrna_dist.search", *args],
                 env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "search stopped early: DARTS+ criterion 2 at epoch 1" in r.stdout + r.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and "criterion 2 at epoch 1" in summary["stopped"]
    g1 = (tmp_path / "s" / "genotype.json").read_text()
    assert g1 == (tmp_path / "s" / "genotypes" / "epoch_001.json").read_text()
    # the same command again resumes, sees the recorded reason, trains nothing
    r2 = run_proc([sys.executable, "-m", "dsrna_dist.search", *args],
                  env=env, timeout=600)
    assert r2.returncode == 0 and "search stopped early" in r2.stdout + r2.stderr
    assert "epoch 2:" not in r2.stdout + r2.stderr
    assert (tmp_path / "s" / "genotype.json").read_text() == g1


def test_report_method_names_for_the_new_methods():
    from dsrna_dist.report import method_name

    none = {"name": "none"}
    assert method_name({"strategy": {"name": "darts"}, "stopping": {"name": "dartsplus"}, "robustness": none}) == "DARTS+"
    assert method_name({"strategy": {"name": "pdarts"}, "robustness": none}) == "P-DARTS"
    assert method_name({"strategy": {"name": "robnet"}, "robustness": none}) == "RobNet"
    assert method_name({"strategy": {"name": "pdarts"}, "robustness": {"name": "jacobian"}}) == "DSRNA-Jacobian (P-DARTS)"
    assert method_name({"strategy": {"name": "sdarts_rs"}, "stopping": {"name": "dartsplus"},
                        "robustness": none}) == "SDARTS-RS + DARTS+ stopping"
    assert method_name({"strategy": {"name": "darts"}, "stopping": {"name": "none"}, "robustness": none}) == "DARTS (1st)"
