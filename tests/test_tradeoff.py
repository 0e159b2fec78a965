"""The arch-gradient trade-off between val loss and robustness term (issue 11, item 3).

The strategy's applied arch gradient is checked against gradients computed independently by
autograd on a copy of the supernet: first order (val loss and R by separate ``autograd.grad``
calls), second order (exact unrolled gradients by double backprop through the virtual SGD step,
float64), in ``trade_off: gamma`` (paper) and ``trade_off: share`` (||g_R|| = share ||g_L||),
for both metrics; and on 2 gloo ranks (alpha, gamma_eff and grad_share identical).
"""
from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

from dsrna_dist.config import SearchConfig, replace
from dsrna_dist.robustness import build_metric
from dsrna_dist.robustness.base import RobustnessMetric
from dsrna_dist.space.supernet import Supernet
from dsrna_dist.strategies import SearchContext, build_strategy
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

torch.set_num_threads(1)
PC = {"strategy.name": "pcdarts", "model.partial_channels": 2, "model.edge_normalization": True}


def info():
    return types.SimpleNamespace(name="t", in_channels=3, image_size=8, num_classes=4,
                                 mean=(0.5,) * 3, std=(0.25,) * 3)


def tiny_cfg(**dotted) -> SearchConfig:
    base = {"model.init_channels": 4, "model.layers": 3, "model.nodes": 2, "epochs": 4,
            "optim.lr": 0.05, "arch_optim.lr": 0.01, **PC}
    base.update(dotted)
    return replace(SearchConfig(), **base)


def make(cfg: SearchConfig, dtype=torch.float32, metric=None):
    from dsrna_dist.search import build_optimizers

    torch.manual_seed(0)
    model = Supernet(cfg.model, info()).to(dtype)
    for p in model.arch_parameters():
        p.data.normal_(0, 0.5)
    w_opt, a_opt = build_optimizers(cfg, model)
    if metric is None and cfg.robustness.name != "none":
        metric = build_metric(cfg.robustness)
    strat = build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w_opt, a_optim=a_opt,
                                         seed=cfg.run.seed, metric=metric))
    return model, w_opt, strat


def batch(n=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def capture(strat) -> dict:
    got: dict = {}
    orig = strat._apply_arch_grads

    def spy(grads, **kw):
        got["g"] = [t.detach().clone() for t in grads]
        return orig(grads, **kw)

    strat._apply_arch_grads = spy
    return got


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


# ----------------------------------------------------------------------------- first order
JAC = {"robustness.name": "jacobian", "robustness.norm": "inf", "robustness.jacobian.estimator": "paper"}
FD = {"robustness.name": "jacobian", "robustness.norm": "2", "robustness.jacobian.estimator": "frobenius_sq_fd"}
CB = {"robustness.name": "certified", "robustness.certified.method": "crown-ibp", "robustness.certified.reduction": "min",
      "robustness.certified.eps": 0.01, "robustness.certified.eps_rule": "fixed"}


def independent_terms(ref, cfg, xv, yv):
    """val loss and R on the copy, by code that shares nothing with the strategy's forward."""
    r_cfg = cfg.robustness
    if r_cfg.jacobian.estimator == "frobenius_sq_fd" and r_cfg.name == "jacobian":  # the joint forward by hand
        from dsrna_dist.robustness.jacobian import fd_frobenius_sq, fd_inputs
        h, n = r_cfg.jacobian.fd_step, xv.shape[0]
        out = ref(torch.cat([xv, fd_inputs(xv, 1, h, generator=torch.Generator().manual_seed(5))]))
        return F.cross_entropy(out[:n], yv), -r_cfg.jacobian.delta * fd_frobenius_sq(out[:n], out[n:], h).mean() / out.shape[1]
    metric = build_metric(replace(r_cfg, bn_stats="own"))        # its own pass over the same batch
    return F.cross_entropy(ref(xv), yv), metric(ref, xv, yv)[0]


@pytest.mark.parametrize("over", [JAC, FD, CB], ids=["jacobian_paper", "jacobian_fd", "certified_min"])
@pytest.mark.parametrize("mode", ["gamma", "share"])
def test_first_order_applied_gradient_is_loss_plus_scaled_robustness_part(over, mode):
    share = 0.5
    gamma = {"jacobian": 1.0, "certified": 0.01}[over["robustness.name"]]
    cfg = tiny_cfg(**over, **{"robustness.trade_off": mode, "robustness.share": share, "robustness.gamma": gamma})
    model, _, strat = make(cfg)
    if hasattr(strat.ctx.metric, "generator"):
        strat.ctx.metric.generator = torch.Generator().manual_seed(5)
    ref = copy.deepcopy(model)
    xv, yv = batch(seed=2)
    got = capture(strat)
    logs = strat.arch_step(xv, yv, xv, yv, epoch=0, step=0, lr=0.05)
    loss, r = independent_terms(ref, cfg, xv, yv)
    A = ref.arch_parameters()
    g_l = flat(torch.autograd.grad(loss, A, retain_graph=True))
    g_r = flat(torch.autograd.grad(r, A))
    g_eff = share * g_l.norm() / g_r.norm() if mode == "share" else torch.tensor(gamma)
    applied = flat(got["g"])
    torch.testing.assert_close(applied, g_l - g_eff * g_r, rtol=1e-4, atol=1e-6 * float(applied.norm()))
    part = (applied - g_l).norm() / g_l.norm()                   # ||g_R|| / ||g_L||
    want = share if mode == "share" else float(gamma * g_r.norm() / g_l.norm())
    assert float(part) == pytest.approx(want, rel=1e-3)
    assert logs["grad_share"] == pytest.approx(want, rel=1e-5)
    assert logs["gamma_eff"] == pytest.approx(float(g_eff), rel=1e-4)
    if over is JAC and mode == "gamma":
        assert logs["grad_share"] > 0.05        # at gamma = 1 the per-example Jacobian term matters
    if mode == "share":                         # the robustness part really turned the gradient
        cos = float(applied @ g_l / (applied.norm() * g_l.norm()))
        assert cos < 0.999


def test_share_mode_is_deterministic_and_stateless():
    """Two strategies from the same state take bit-identical steps; gamma_eff lives in no state."""
    cfg = tiny_cfg(**JAC, **{"robustness.trade_off": "share", "robustness.share": 0.3})
    runs = []
    for _ in range(2):
        model, _, strat = make(cfg)
        logs = [strat.step(*batch(seed=10 + i), *batch(seed=20 + i), epoch=0, step=i, lr=0.05) for i in range(2)]
        runs.append((flat(model.arch_parameters()), [lg["gamma_eff"] for lg in logs]))
        assert strat.state_dict() == {"name": "pcdarts"}
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


# ----------------------------------------------------------------------------- second order
class LogitEnergy(RobustnessMetric):
    """R = -mean(logits^2): cheap, smooth, and a function of (w, alpha) through the forward."""

    name = "energy"

    def __call__(self, model, x, y, *, logits=None, extra=None, update=True):
        r = -(logits ** 2).mean()
        return r, {"R": float(r.detach())}


def exact_unrolled(model, w_opt, xt, yt, xv, yv, eta, term):
    """d term(w'(alpha), alpha)/d alpha, w' = the virtual SGD step, by double backprop."""
    arch = set(model.arch_parameter_names())
    params = dict(model.named_parameters())
    W = {n: p for n, p in params.items() if n not in arch}
    A = {n: p for n, p in params.items() if n in arch}
    group = w_opt.param_groups[0]
    loss_t = F.cross_entropy(torch.func.functional_call(model, {**W, **A}, (xt,)), yt)
    g = torch.autograd.grad(loss_t, list(W.values()), create_graph=True)
    W2 = {n: w - eta * (group["momentum"] * w_opt.state[w]["momentum_buffer"] + gw + group["weight_decay"] * w)
          for (n, w), gw in zip(W.items(), g)}
    logits = torch.func.functional_call(model, {**W2, **A}, (xv,))
    return flat(torch.autograd.grad(term(logits), list(A.values())))


@pytest.mark.parametrize("mode", ["gamma", "share"])
def test_second_order_matches_exact_unrolled_terms(mode):
    share, gamma = 0.7, 0.3
    cfg = tiny_cfg(**{"strategy.order": 2, "strategy.fd_r": 1e-5, "optim.weight_decay": 1e-2,
                      "robustness.trade_off": mode, "robustness.share": share, "robustness.gamma": gamma})
    model, w_opt, strat = make(cfg, dtype=torch.float64, metric=LogitEnergy(cfg.robustness))
    xt, yt = batch(seed=1, dtype=torch.float64)
    xv, yv = batch(seed=2, dtype=torch.float64)
    strat.weight_step(xt, yt, epoch=0, step=0)                  # momentum buffers for the virtual step
    g_l = exact_unrolled(model, w_opt, xt, yt, xv, yv, 0.05, lambda lo: F.cross_entropy(lo, yv))
    g_r = exact_unrolled(model, w_opt, xt, yt, xv, yv, 0.05, lambda lo: -(lo ** 2).mean())
    first = flat(torch.autograd.grad(F.cross_entropy(model(xv), yv), model.arch_parameters()))
    assert (first - g_l).norm() > 1e-3 * g_l.norm()            # the unrolled term is not negligible
    got = capture(strat)
    logs = strat.arch_step(xt, yt, xv, yv, epoch=0, step=1, lr=0.05)
    g_eff = share * g_l.norm() / g_r.norm() if mode == "share" else gamma
    expected = g_l - g_eff * g_r
    applied = flat(got["g"])
    assert float((applied - expected).norm()) < 1e-4 * float(expected.norm())
    want = share if mode == "share" else float(gamma * g_r.norm() / g_l.norm())
    assert float((applied - g_l).norm() / g_l.norm()) == pytest.approx(want, rel=1e-3)
    assert logs["grad_share"] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("over", [JAC, CB], ids=["jacobian_paper", "certified_min"])
def test_second_order_with_each_metric_decomposes_against_plain_darts(over):
    """2nd order, share mode, real metrics: the applied gradient minus the metric-free
    strategy's unrolled gradient (same weights, momentum and batches) has share * its norm."""
    share = 0.4
    cfg = tiny_cfg(**over, **{"strategy.order": 2, "robustness.trade_off": "share", "robustness.share": share})
    plain_cfg = replace(cfg, **{"robustness.name": "none"})
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    grads = []
    for c in (plain_cfg, cfg):
        model, _, strat = make(c)
        strat.weight_step(xt, yt, epoch=0, step=0)
        got = capture(strat)
        logs = strat.arch_step(xt, yt, xv, yv, epoch=0, step=1, lr=0.05)
        grads.append(flat(got["g"]))
    g_l, applied = grads
    assert float((applied - g_l).norm() / g_l.norm()) == pytest.approx(share, rel=2e-3)
    assert logs["grad_share"] == pytest.approx(share, rel=1e-5)


# ----------------------------------------------------------------------------- 2 ranks
DIST = [dict(JAC), dict(CB, **{"robustness.certified.eps_rule": "log", "robustness.certified.eps_target_gap": 1.0}),
        dict(JAC, **{"strategy.order": 2}), dict(CB, **{"strategy.order": 2})]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dsrna_dist.search import build_optimizers, wrap_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {"world": dist.get_world_size()}
    for i, over in enumerate(DIST):
        cfg = tiny_cfg(**over, **{"robustness.trade_off": "share", "robustness.share": 0.5})
        torch.manual_seed(0)
        model = Supernet(cfg.model, info())
        w_opt, a_opt = build_optimizers(cfg, model)
        metric = build_metric(cfg.robustness)
        strat = build_strategy(SearchContext(cfg=cfg, model=model, net=wrap_ddp(model, world), w_optim=w_opt,
                                             a_optim=a_opt, seed=0, metric=metric))
        shares = []
        for step in range(2):
            xt, yt = batch(seed=100 * rank + 2 * step)
            xv, yv = batch(seed=100 * rank + 2 * step + 1)
            logs = strat.step(xt, yt, xv, yv, epoch=0, step=step, lr=0.05)
            shares.append((logs["grad_share"], logs["gamma_eff"], logs["R"]))
        gathered = [None] * world
        dist.all_gather_object(gathered, (flat(model.arch_parameters()).tolist(), shares, metric.state_dict()))
        (a0, s0, m0), (a1, s1, m1) = gathered
        report[str(i)] = {"alpha_identical": a0 == a1, "share_identical": [s[:2] for s in s0] == [s[:2] for s in s1],
                          "R_differs": [s[2] for s in s0] != [s[2] for s in s1], "metric_state_identical": m0 == m1,
                          "shares": [s[0] for s in s0]}
    if rank == 0:
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f)
    from dsrna_dist.engine.runtime import teardown

    teardown(None, 0, hard_exit=True)


@pytest.mark.slow  # ~35 s, `make test-all`: 2-rank arch steps with each metric: test_robustness
@pytest.mark.dist
def test_share_mode_two_ranks_identical_alpha(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report.pop("world") == 2
    for case, r in report.items():
        assert r["alpha_identical"] and r["share_identical"] and r["metric_state_identical"], (case, r)
        assert r["R_differs"], (case, r)                      # each rank saw its own data
        assert r["shares"] == pytest.approx([0.5, 0.5], rel=1e-5), (case, r)


# ----------------------------------------------------------------------------- the stage
def test_search_logs_grad_share_eps_and_gap_to_tensorboard_and_summary(tmp_path):
    """A real search run (CLI, synthetic data): grad_share (= the configured share), eps and
    the bound gap reach the step scalars in TensorBoard and the summary's epoch means."""
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--data.name=synthetic", "--data.synthetic_size=64", "--data.synthetic_shape=[3,8,8]",
            "--data.synthetic_classes=4", "--data.batch_size=8", "--model.init_channels=4", "--model.layers=3",
            "--model.nodes=2", "--run.progress=false", "--steps_per_epoch=2", "--epochs=1", "--run.log_every=1",
            "--strategy.name=pcdarts", "--model.partial_channels=2", "--model.edge_normalization=true",
            "--robustness.name=certified", "--robustness.certified.reduction=min", "--robustness.certified.eps_rule=log",
            "--robustness.certified.eps_min=1e-6", "--robustness.trade_off=share", "--robustness.share=0.25",
            "--run.name=s", f"--run.out_dir={tmp_path}"]
    r = run_proc([sys.executable, "-m", "dsrna_dist.search", *args],
                 env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    means = summary["last_epoch_means"]
    assert means["grad_share"] == pytest.approx(0.25, rel=1e-5)
    assert means["metric/bound_gap"] > 0 and 0 < means["metric/eps"] <= 0.03 and means["gamma_eff"] > 0
    tb_dir = next(p.parent for p in (tmp_path / "s").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(tb_dir)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/grad_share", "step/metric/eps", "step/metric/bound_gap", "step/gamma_eff"} <= tags, tags
    eps = [e.value for e in acc.Scalars("step/metric/eps")]
    assert len(eps) == 2 and eps[1] < eps[0]                       # the gap was wide: eps shrank
