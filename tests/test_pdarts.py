"""P-DARTS: stage schedule, search-space approximation, skip-connect dropout and cap, per-edge
op lists in the supernet, and the search stage across a stage change (kill + resume)."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsrna_dist.config import ConfigError, PDARTSConfig, SearchConfig, replace
from dsrna_dist.search import build_optimizers, check_config
from dsrna_dist.space.cells import MixedOp
from dsrna_dist.space.supernet import Supernet, derive_genotype, num_edges
from dsrna_dist.strategies import SearchContext, build_strategy
from dsrna_dist.strategies.pdarts import prune_ops
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)
from _tiny import tiny_search_args  # noqa: E402

torch.set_num_threads(1)
PRIMS = SearchConfig().model.primitives


def info(c=3, size=8, k=4):
    return types.SimpleNamespace(name="t", in_channels=c, image_size=size, num_classes=k,
                                 mean=(0.5,) * c, std=(0.25,) * c)


def tiny_cfg(**dotted):
    base = {"strategy.name": "pdarts", "model.init_channels": 4, "model.layers": 3, "model.nodes": 2,
            "epochs": 4, "pdarts.stage_layers": [3, 4], "pdarts.stage_epochs": [2, 2],
            "pdarts.keep_ops": [3], "pdarts.skip_dropout": [0.1, 0.4], "pdarts.arch_start_epoch": 1,
            "optim.lr": 0.05, "arch_optim.lr": 0.01}
    base.update(dotted)
    return replace(SearchConfig(), **base)


def make(cfg, metric=None):
    torch.manual_seed(0)
    model = Supernet(cfg.model, info())
    w, a = build_optimizers(cfg, model)
    return build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w, a_optim=a,
                                        metric=metric, seed=0))


def rebuild(strat):
    """What search.setup_supernet does at a stage change, without a Runtime."""
    cfg = strat.cfg
    model = Supernet(strat.supernet_config(), info(), strat.supernet_mask())
    w, a = build_optimizers(cfg, model)
    strat.bind(SearchContext(cfg=cfg, model=model, net=model, w_optim=w, a_optim=a,
                             metric=strat.ctx.metric, seed=0))


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# --------------------------------------------------------------------------- published settings
def reference_schedule(stage_epochs, eps_no_arch, drop_rate, scale_factor):
    """The reference train_search.py loop, transcribed: per (stage, epoch) the dropout rate and
    whether the arch is trained; a fresh cosine scheduler (T_max = stage epochs) per stage."""
    out = []
    for sp, epochs in enumerate(stage_epochs):
        for epoch in range(epochs):
            if epoch < eps_no_arch:
                p, arch = float(drop_rate[sp]) * (epochs - epoch - 1) / epochs, False
            else:
                p, arch = float(drop_rate[sp]) * np.exp(-(epoch - eps_no_arch) * scale_factor), True
            out.append((sp, p, arch, epoch, epochs))
    return out


def test_defaults_are_the_published_cifar10_settings_and_schedule_matches_reference():
    p = PDARTSConfig()
    # Chen et al. 2019 / chenxin061/pdarts: 5 cells + add_layers 6, 12; 25 epochs a stage;
    # 8 -> 5 -> 3 ops (num_to_keep [5, 3, 1], the last is the genotype); dropout 0.1/0.4/0.7;
    # 10 epochs without arch updates; scale_factor 0.2; at most 2 skips in the normal cell
    assert p.stage_layers == (5, 5 + 6, 5 + 12) and p.stage_epochs == (25,) * 3
    assert (len(PRIMS),) + p.keep_ops == (8, 5, 3)
    assert p.skip_dropout == (0.1, 0.4, 0.7) and p.arch_start_epoch == 10
    assert p.dropout_decay == 0.2 and p.max_skip == 2
    cfg = replace(SearchConfig(), **{"strategy.name": "pdarts", "epochs": 75})
    check_config(cfg)
    strat = make(replace(cfg, **{"model.layers": 5, "model.init_channels": 4, "model.nodes": 2}))
    ref = reference_schedule(p.stage_epochs, p.arch_start_epoch, p.skip_dropout, p.dropout_decay)
    assert len(ref) == cfg.epochs
    for epoch, (sp, rate, arch, e_in, n_in) in enumerate(ref):
        assert strat.stage_of(epoch) == sp
        assert math.isclose(strat.skip_rate(epoch), rate, rel_tol=1e-12, abs_tol=1e-15), epoch
        assert strat.arch_active(epoch) == arch
        assert strat.lr_position(epoch) == (e_in, n_in)
        assert strat.arch_lr_position(epoch) == (e_in, p.arch_start_epoch, n_in)  # a decaying arch lr too
    # the lr restarts at its maximum on the first epoch of every stage
    from dsrna_dist.engine.schedule import lr_at

    lrs = [lr_at(cfg.optim, strat.lr_position(e)[0], 0, 10, strat.lr_position(e)[1]) for e in range(75)]
    assert lrs[0] == lrs[25] == lrs[50] == cfg.optim.lr and lrs[24] < lrs[1]


@pytest.mark.parametrize("bad,key", [({"epochs": 5}, "pdarts.stage_epochs"),
                                     ({"pdarts.keep_ops": [3, 2]}, "pdarts.keep_ops"),
                                     ({"pdarts.keep_ops": [9]}, "pdarts.keep_ops"),
                                     ({"pdarts.skip_dropout": [0.1]}, "pdarts.skip_dropout"),
                                     ({"strategy.arch_start_epoch": 3}, "strategy.arch_start_epoch"),
                                     ({"strategy.max_skip": 2}, "strategy.max_skip")])
def test_bad_stage_settings_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(tiny_cfg(**bad))


# --------------------------------------------------------------------------- space approximation
def test_prune_keeps_top_k_per_edge_on_a_constructed_alpha():
    g = torch.Generator().manual_seed(3)
    edges, ops = num_edges(4), len(PRIMS)
    alpha = torch.randn(edges, ops, generator=g)
    mask = torch.ones(edges, ops, dtype=torch.bool)
    m5 = prune_ops(alpha, mask, 5, PRIMS)
    m3 = prune_ops(alpha, m5, 3, PRIMS)
    a = alpha.numpy()
    for e in range(edges):
        # independent: numpy argsort of the full row, the largest k
        assert set(np.flatnonzero(m5[e].numpy())) == set(np.argsort(-a[e])[:5].tolist())
        assert set(np.flatnonzero(m3[e].numpy())) == set(np.argsort(-a[e])[:3].tolist())
    assert m5.sum(1).tolist() == [5] * edges and bool((m3 <= m5).all())
    # alpha changes after the first prune: the second keeps the top 3 *among the remaining 5*
    alpha2 = torch.randn(edges, ops, generator=g)
    m3b = prune_ops(alpha2, m5, 3, PRIMS)
    for e in range(edges):
        allowed = np.flatnonzero(m5[e].numpy())
        top = allowed[np.argsort(-alpha2[e].numpy()[allowed])[:3]]
        assert set(np.flatnonzero(m3b[e].numpy())) == set(top.tolist())
    # an edge whose strongest op is `none` still keeps a real op when only one survives
    row = torch.full((1, ops), -1.0)
    row[0, PRIMS.index("none")] = 5.0
    row[0, PRIMS.index("dil_conv_5x5")] = 1.0
    kept = prune_ops(row, torch.ones(1, ops, dtype=torch.bool), 1, PRIMS)
    assert np.flatnonzero(kept[0].numpy()).tolist() == [PRIMS.index("dil_conv_5x5")]


@pytest.mark.parametrize("pc", [False, True])
def test_masked_supernet_builds_only_kept_ops_and_masks_alpha(pc):
    cfg = tiny_cfg(**({"model.partial_channels": 2, "model.edge_normalization": True} if pc else {}))
    g = torch.Generator().manual_seed(1)
    edges, ops = num_edges(2), len(PRIMS)
    mask = {k: prune_ops(torch.randn(edges, ops, generator=g), torch.ones(edges, ops, dtype=torch.bool), 3, PRIMS)
            for k in ("normal", "reduce")}
    model = Supernet(cfg.model, info(), mask)
    for cell in model.cells:
        kind = "reduce" if cell.reduction else "normal"
        for e, edge in enumerate(cell.edges):
            edge = edge.mixed if pc else edge  # PC-DARTS: the partial-channel edge wraps a MixedOp
            kept = [k for k in range(ops) if mask[kind][e, k] and PRIMS[k] != "none"]
            assert list(edge.index) == kept and len(edge.ops) == len(kept)
    w = model.arch_weights()
    for k in ("normal", "reduce"):
        assert torch.equal(w[k][~mask[k]], torch.zeros(int((~mask[k]).sum())))
        assert torch.allclose(w[k].sum(-1), torch.ones(edges))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    for k in ("normal", "reduce"):
        grad = getattr(model, f"alphas_{k}").grad
        assert torch.equal(grad[~mask[k]], torch.zeros(int((~mask[k]).sum())))
        assert grad[mask[k]].abs().sum() > 0
    # a derived cell never holds a pruned op, and the mask round-trips
    gt = model.derive()
    starts = [0, 2]
    for idx, (op, src) in enumerate(gt.normal):
        assert mask["normal"][starts[idx // 2] + src, PRIMS.index(op)]
    assert all(torch.equal(model.op_mask()[k], mask[k]) for k in mask)
    # the state dict is the unmasked layout's (masks are not persistent)
    assert not any("mask" in key for key in model.state_dict())


def test_masked_supernet_goes_through_the_bound_engine():
    from dsrna_dist.bounds import BoundedModel

    cfg = tiny_cfg()
    edges, ops = num_edges(2), len(PRIMS)
    g = torch.Generator().manual_seed(2)
    mask = {k: prune_ops(torch.randn(edges, ops, generator=g), torch.ones(edges, ops, dtype=torch.bool), 3, PRIMS)
            for k in ("normal", "reduce")}
    torch.manual_seed(0)
    model = Supernet(cfg.model, info(), mask).eval()
    x, _ = batch(4)
    bm = BoundedModel(model)
    eps = 0.01
    lb, ub = bm.bounds(x, eps, method="ibp")
    logits = model(x)
    assert bool((lb <= logits + 1e-5).all() and (logits <= ub + 1e-5).all())
    for _ in range(5):  # sampled points of the box stay inside the bounds
        xp = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        out = model(xp)
        assert bool((lb <= out + 1e-5).all() and (out <= ub + 1e-5).all())


# --------------------------------------------------------------------------- skip dropout
def test_skip_dropout_only_in_the_weight_step():
    strat = make(tiny_cfg())
    model = strat.model
    edge = next(m for m in model.modules() if isinstance(m, MixedOp) and m.skip_pos >= 0)
    seen = []
    orig = edge.forward

    def spy(x, w):
        seen.append((torch.is_grad_enabled(), edge.skip_p))
        return orig(x, w)

    edge.forward = spy
    xt, yt = batch()
    xv, yv = batch(seed=2)
    logs = strat.step(xt, yt, xv, yv, epoch=1, step=0, lr=0.05)  # epoch 1: arch active
    assert logs["skip_dropout"] == pytest.approx(0.1)
    assert (True, 0.0) in seen and (True, 0.1) in seen  # arch step without, weight step with
    assert edge.skip_p == 0.0  # reset afterwards: bounds / evaluation see no dropout
    # the dropout really acts on the skip branch and only on it
    edge.forward = orig
    e = MixedOp(4, 1, ("skip_connect", "avg_pool_3x3"))
    x = torch.randn(2, 4, 5, 5)
    w = torch.tensor([1.0, 0.0])
    e.skip_p = 0.5
    torch.manual_seed(0)
    out = e(x, w)
    assert ((out == 0) | torch.isclose(out, 2 * x)).all() and (out == 0).any()
    e.eval()
    assert torch.equal(e(x, w), x)


# --------------------------------------------------------------------------- skip cap
def reference_skip_cap(w, prims, nodes, max_sk):
    """The reference's final parse, transcribed independently (numpy, no shared code):
    keep_1_on (best non-none op per edge), keep_2_branches (2 strongest edges per node), then
    while too many skips: zero the smallest chosen skip prob (delete_min_sk_prob) and redo."""
    w = w.copy()
    none, sk = prims.index("none"), prims.index("skip_connect")
    w[:, none] = -np.inf

    def parse(w):
        starts = [sum(2 + n for n in range(i)) for i in range(nodes)]
        gene = []
        for i in range(nodes):
            rows = w[starts[i]:starts[i] + 2 + i]
            best = rows.max(1)
            order = sorted(range(2 + i), key=lambda j: -best[j])[:2]
            gene += [(starts[i] + j, int(np.argmax(rows[j])), j) for j in order]
        return gene

    gene = parse(w)
    while sum(op == sk for _, op, _ in gene) > max_sk:
        row = min((w[r, sk], r) for r, op, _ in gene if op == sk)[1]
        w[row, sk] = -np.inf
        gene = parse(w)
    return sorted((prims[op], src, r) for r, op, src in gene)


@pytest.mark.parametrize("seed", range(6))
def test_skip_cap_matches_reference_parse(seed):
    g = torch.Generator().manual_seed(seed)
    nodes = 4
    edges = num_edges(nodes)
    w = torch.rand(edges, len(PRIMS), generator=g)
    w[:, PRIMS.index("skip_connect")] += 0.7  # skip dominates: the cap must act
    w = w / w.sum(1, keepdim=True)
    ref = reference_skip_cap(w.numpy().astype(np.float64), list(PRIMS), nodes, 2)
    gt = derive_genotype(w, w.clone(), PRIMS, nodes, max_skip=2)
    starts = [sum(2 + n for n in range(i)) for i in range(nodes)]
    ours = sorted((op, src, starts[i // 2] + src) for i, (op, src) in enumerate(gt.normal))
    assert ours == ref
    assert sum(op == "skip_connect" for op, _ in gt.normal) <= 2
    assert sum(op == "skip_connect" for op, _ in derive_genotype(w, w, PRIMS, nodes).normal) > 2


# --------------------------------------------------------------------------- stage change
def test_stage_change_prunes_deepens_and_keeps_searching_with_a_metric():
    from dsrna_dist.robustness import build_metric

    cfg = tiny_cfg(**{"robustness.name": "jacobian", "robustness.gamma": 0.01})
    strat = make(cfg, metric=build_metric(cfg.robustness))
    assert strat.supernet_mask() is None and strat.supernet_config().layers == 3 == len(strat.model.cells)
    for epoch in range(4):
        for step in range(2):
            xt, yt = batch(seed=10 * epoch + step)
            xv, yv = batch(seed=10 * epoch + step + 5)
            logs = strat.step(xt, yt, xv, yv, epoch=epoch, step=2 * epoch + step, lr=0.05)
            assert all(math.isfinite(v) for v in logs.values())
            assert ("R" in logs) == strat.arch_active(epoch)
        alpha = {k: getattr(strat.model, f"alphas_{k}").detach().clone() for k in ("normal", "reduce")}
        changed = strat.on_epoch_end(epoch, strat.genotype(), {})
        assert changed == (epoch == 1)
        if changed:
            mask = strat.supernet_mask()
            for k in ("normal", "reduce"):
                assert mask[k].sum(1).tolist() == [3] * num_edges(2)
                assert torch.equal(mask[k], prune_ops(alpha[k], torch.ones_like(mask[k]), 3, PRIMS))
            rebuild(strat)
            assert len(strat.model.cells) == 4 and strat.stage == 1
    state = json.loads(json.dumps(strat.state_dict()))  # JSON-able: lists, ints
    other = make(cfg)
    other.load_state_dict(state)
    assert other.stage == 1 and all(torch.equal(other.supernet_mask()[k], strat.supernet_mask()[k])
                                    for k in ("normal", "reduce"))


TINY_ARGS = [*tiny_search_args(layers=2), "--run.tensorboard=false",
             "--strategy.name=pdarts", "--epochs=4", "--pdarts.stage_layers=[3,4]",
             "--pdarts.stage_epochs=[2,2]", "--pdarts.keep_ops=[3]", "--pdarts.skip_dropout=[0.1,0.4]",
             "--pdarts.arch_start_epoch=1"]


def launch(args, env_extra=None, ranks=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if ranks == 1:
        cmd = [sys.executable, "-m", "dsrna_dist.search", *args]
    else:
        import shutil

        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(ranks), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "dsrna_dist.search", *args]
    return run_proc(cmd, env=env, timeout=600)


def check_kill_and_resume_across_stage_change(tmp_path, ranks, stop_at):
    args = [*TINY_ARGS, f"--run.out_dir={tmp_path}"]
    if ranks > 1:
        args.append("--data.batch_size=4")
    full = launch([*args, "--run.name=full"], ranks=ranks)
    out = full.stdout + full.stderr
    assert full.returncode == 0, out[-3000:]
    # stage 0 searches pdarts.stage_layers[0] = 3 cells although model.layers = 2
    assert "supernet of 3 cells" in out and "supernet of 2 cells" not in out
    assert "supernet rebuilt: 4 cells, at most 3 candidate ops" in out
    if ranks > 1:
        assert "world_size=2" in out and out.count(f"alpha identical on {ranks} ranks") == 4
    killed = launch([*args, "--run.name=resumed"], {"DSRNA_STOP_AFTER_STEPS": str(stop_at)}, ranks=ranks)
    assert killed.returncode != 0
    part = tmp_path / "resumed"
    ck = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["strategy"]["stage"] == 1 and ck["strategy"]["op_masks"] is not None
    resumed = launch([*args, "--run.name=resumed"], ranks=ranks)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and "supernet of 4 cells" in out  # resumed into stage 1
    if ranks > 1:
        assert out.count(f"alpha identical on {ranks} ranks") == 2
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    assert a["strategy"] == b["strategy"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name in ("genotype.json", "alphas.jsonl", "genotypes/epoch_003.json"):
        assert (tmp_path / "full" / name).read_text() == (part / name).read_text(), name
    # the final supernet is the stage-2 one: 4 cells, alpha masked to 3 ops per edge
    assert sum(k.endswith("preprocess1.1.weight") for k in a["model"]) == 4
    hist = [json.loads(line) for line in (part / "alphas.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert all(sum(v > 0 for v in row) == 3 for row in hist[-1]["weights_normal"])
    summary = json.loads((part / "summary.json").read_text())
    assert summary["stopped"] is None and summary["epochs_run"] == 4


@pytest.mark.slow
def test_killed_pdarts_search_resumes_mid_stage_after_a_stage_change(tmp_path):
    """One process: killed in epoch 2 (stage 2, after the rebuild), resumed bit-identically."""
    check_kill_and_resume_across_stage_change(tmp_path, ranks=1, stop_at=7)


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_pdarts_across_a_stage_change_resumed_mid_stage(tmp_path):
    """2 gloo ranks via accelerate: alpha identical on both ranks every epoch (checked by the
    loop), killed mid stage 2 and resumed to the uninterrupted run's exact weights and alpha."""
    check_kill_and_resume_across_stage_change(tmp_path, ranks=2, stop_at=7)


def test_decaying_arch_lr_restarts_every_stage(tmp_path):
    """Every stage starts from a fresh alpha, so a decaying arch lr (arch_optim.schedule) runs
    its whole decay within each stage, from its arch start to the stage's end; one decay over
    the whole search would leave the last stage, the one that picks the cell, ~1% of the lr."""
    r = launch([*TINY_ARGS, "--arch_optim.schedule=cosine", "--arch_optim.lr=0.2",
                f"--run.out_dir={tmp_path}", "--run.name=s"])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "s" / "checkpoints" / "last.pt", weights_only=True)
    lr = ck["optimizers"]["arch"]["param_groups"][0]["lr"]
    # the last step: stage 1 (epochs 2-3), its epoch 1 of 2, step 2 of 3; arch updates from its
    # epoch 1, so the decay's progress is (1 + 2/3 - 1) / (2 - 1) = 2/3 (over the search: 11/12)
    assert lr == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
