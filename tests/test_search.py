"""Search strategies (DARTS 1st/2nd order, PC-DARTS, SDARTS-RS/ADV), schedule, and the stage."""
import copy
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dsrna_dist.config import ConfigError, SearchConfig, replace
from dsrna_dist.space.supernet import Supernet
from dsrna_dist.strategies import STRATEGIES, NonFiniteLossError, SearchContext, build_strategy
from dsrna_dist.strategies.perturb import clip_to_simplex, linf_pgd, ramp_eps, step_generator
from dsrna_dist.engine.schedule import lr_at
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)
from _tiny import tiny_search_args  # noqa: E402

torch.set_num_threads(1)


def info(c=3, size=8, k=4):
    return types.SimpleNamespace(name="t", in_channels=c, image_size=size, num_classes=k,
                                 mean=(0.5,) * c, std=(0.25,) * c)


def tiny_cfg(**dotted):
    base = {"model.init_channels": 4, "model.layers": 3, "model.nodes": 2, "epochs": 4,
            "optim.lr": 0.05, "arch_optim.lr": 0.01}
    base.update(dotted)
    return replace(SearchConfig(), **base)


def make(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Supernet(cfg.model, info()).to(dtype)
    from dsrna_dist.search import build_optimizers

    w_opt, a_opt = build_optimizers(cfg, model)
    strat = build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w_opt,
                                         a_optim=a_opt, seed=cfg.run.seed))
    return model, w_opt, a_opt, strat


def batch(n=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def test_registry_and_config_checks():
    assert set(STRATEGIES.names()) >= {"darts", "pcdarts", "sdarts_rs", "sdarts_adv", "pcdarts_adv"}
    with pytest.raises(ConfigError, match="model.partial_channels"):
        make(tiny_cfg(**{"strategy.name": "pcdarts"}))
    with pytest.raises(ConfigError, match="model.edge_normalization"):
        make(tiny_cfg(**{"strategy.name": "pcdarts_adv", "model.partial_channels": 2}))
    with pytest.raises(ConfigError, match="strategy.order"):
        make(tiny_cfg(**{"strategy.order": 2, "optim.name": "adamw"}))
    with pytest.raises(Exception, match="strategy.name"):
        make(tiny_cfg(**{"strategy.name": "enas"}))


def test_first_order_arch_step_equals_independent_adam_step():
    cfg = tiny_cfg()
    model, _, _, strat = make(cfg)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.arch_parameters(), lr=cfg.arch_optim.lr, betas=(0.5, 0.999),
                               weight_decay=cfg.arch_optim.weight_decay)
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    for step in range(2):
        strat.arch_step(xt, yt, xv, yv, epoch=0, step=step, lr=0.05)
        ref_opt.zero_grad()
        F.cross_entropy(ref(xv), yv).backward()
        ref_opt.step()
    for p, q in zip(model.arch_parameters(), ref.arch_parameters()):
        torch.testing.assert_close(p, q)
        assert not torch.equal(p, torch.zeros_like(p))
    for p, q in zip(model.weight_parameters(), ref.weight_parameters()):
        assert torch.equal(p, q)  # the arch step never moves the weights


def exact_unrolled_alpha_grad(model, w_opt, xt, yt, xv, yv, eta):
    """Exact DARTS 2nd-order gradient by double backprop through the virtual step (float64)."""
    arch = set(model.arch_parameter_names())
    params = dict(model.named_parameters())
    W = {n: p for n, p in params.items() if n not in arch}
    A = {n: p for n, p in params.items() if n in arch}
    group = w_opt.param_groups[0]
    loss_t = F.cross_entropy(torch.func.functional_call(model, {**W, **A}, (xt,)), yt)
    g = torch.autograd.grad(loss_t, list(W.values()), create_graph=True)
    W2 = {}
    for (n, w), gw in zip(W.items(), g):
        buf = w_opt.state[w]["momentum_buffer"]
        W2[n] = w - eta * (group["momentum"] * buf + gw + group["weight_decay"] * w)
    loss_v = F.cross_entropy(torch.func.functional_call(model, {**W2, **A}, (xv,)), yv)
    return torch.autograd.grad(loss_v, list(A.values()))


def test_second_order_matches_exact_unrolled_gradient():
    # float64 and a small finite-difference step: the FD product then converges to the exact
    # Hessian term (the reference r = 0.01 is a speed/accuracy trade-off, not part of the math)
    cfg = tiny_cfg(**{"strategy.order": 2, "optim.weight_decay": 1e-2, "strategy.fd_r": 1e-5})
    model, w_opt, a_opt, strat = make(cfg, dtype=torch.float64)
    xt, yt = batch(seed=1, dtype=torch.float64)
    xv, yv = batch(seed=2, dtype=torch.float64)
    strat.weight_step(xt, yt, epoch=0, step=0)  # creates the momentum buffers the step uses
    eta = 0.05
    expected = exact_unrolled_alpha_grad(model, w_opt, xt, yt, xv, yv, eta)
    # the first-order gradient alone must be measurably different, or the test proves nothing
    first = torch.autograd.grad(F.cross_entropy(model(xv), yv), model.arch_parameters())
    gap = sum((a - b).norm() for a, b in zip(first, expected))
    weights_before = [p.detach().clone() for p in model.weight_parameters()]
    captured = {}
    orig = strat._apply_arch_grads
    strat._apply_arch_grads = lambda grads: captured.setdefault("g", [t.clone() for t in grads]) and orig(grads)
    strat.arch_step(xt, yt, xv, yv, epoch=0, step=1, lr=eta)
    err = sum((a - b).norm() for a, b in zip(captured["g"], expected))
    assert gap > 1e-6 and err < 1e-3 * gap, (float(err), float(gap))
    for p, b in zip(model.weight_parameters(), weights_before):
        assert torch.equal(p, b)  # weights restored exactly after the virtual step


def test_second_order_step_survives_a_huge_objective_scale():
    """DSRNA-CB's loose bounds make |gamma * R| ~ 1e24 on the full DARTS space: the weight
    gradient v of the objective then overflows a float32 sum of squares. The finite-difference
    radius r = fd_r / ||v|| must still be finite and non-zero, and the arch gradient finite."""
    from dsrna_dist.robustness.base import RobustnessMetric

    class Huge(RobustnessMetric):
        name = "huge"

        def __call__(self, model, x, y, *, logits=None, extra=None, update=True):
            return -1e22 * logits.pow(2).mean(), {}

    cfg = tiny_cfg(**{"strategy.order": 2, "robustness.gamma": 1.0})
    model, w_opt, a_opt, strat = make(cfg)
    strat.ctx.metric = Huge(cfg.robustness)
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    v = torch.autograd.grad(strat.arch_objective(xv, yv, {}), model.weight_parameters(), allow_unused=True)
    assert not torch.isfinite(torch.cat([t.reshape(-1) for t in v if t is not None]).norm())  # the trap
    captured = {}
    orig = strat._apply_arch_grads
    strat._apply_arch_grads = lambda grads, **kw: captured.setdefault("g", [t.clone() for t in grads]) and orig(grads, **kw)
    strat.arch_step(xt, yt, xv, yv, epoch=0, step=0, lr=0.05)
    assert all(torch.isfinite(g).all() for g in captured["g"])
    assert all(torch.isfinite(a).all() for a in model.arch_parameters())


def test_huge_arch_gradients_still_move_alpha():
    """float32 Adam would square 1e25 into inf and step 0; scaled to 1e15 the first Adam step
    moves every alpha by lr (the sign step), and ordinary gradients pass unchanged."""
    cfg = tiny_cfg(**{"arch_optim.weight_decay": 0.0})
    model, w_opt, a_opt, strat = make(cfg)
    before = [p.detach().clone() for p in model.arch_parameters()]
    strat._apply_arch_grads([torch.full_like(p, 1e25) for p in model.arch_parameters()])
    lr = a_opt.param_groups[0]["lr"]
    for p, b in zip(model.arch_parameters(), before):
        torch.testing.assert_close(b - p.detach(), torch.full_like(p, lr), rtol=1e-4, atol=1e-7)
    g = [torch.randn_like(p) for p in model.arch_parameters()]
    strat._apply_arch_grads([t.clone() for t in g])
    for p, t in zip(model.arch_parameters(), g):
        assert torch.equal(p.grad, t)


@pytest.mark.parametrize("order", [1, 2])
def test_non_finite_metric_stops_the_arch_step_with_its_name(order):
    """Bounds that overflow (R = -inf / NaN) stop the search with an error naming the metric,
    before any parameter changes (2nd order: the weights of the virtual step are restored)."""
    from dsrna_dist.robustness.base import RobustnessMetric
    from dsrna_dist.strategies import NonFiniteLossError

    class Overflow(RobustnessMetric):
        name = "overflow"

        def __call__(self, model, x, y, *, logits=None, extra=None, update=True):
            return logits.sum() * float("nan"), {}

    cfg = tiny_cfg(**{"strategy.order": order})
    model, w_opt, a_opt, strat = make(cfg)
    strat.ctx.metric = Overflow(cfg.robustness)
    before = [p.detach().clone() for p in model.parameters()]
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    with pytest.raises(NonFiniteLossError, match="'overflow' gave a non-finite R"):
        strat.arch_step(xt, yt, xv, yv, epoch=0, step=0, lr=0.05)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_clip_to_simplex_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g) * 0.4
    w[3] = -torch.rand(8, generator=g)  # an all-negative row -> one-hot at its argmax
    ref = w.clone()
    for line in ref:  # the SDARTS reference `clip`, row by row
        max_index = line.argmax()
        line.clamp_(0, 1)
        if line.sum() == 0.0:
            line[max_index] = 1.0
        line.div_(line.sum())
    torch.testing.assert_close(clip_to_simplex(w), ref)


def test_pgd_reaches_known_maximizer_and_beats_random():
    # linear objective <c, w> with one positive coefficient per row: the max on the simplex is one-hot
    c = torch.tensor([[1.0, -1.0, -0.5, -2.0], [-1.0, -1.0, 0.5, -0.2]])
    base = {"normal": torch.full((2, 4), 0.25), "reduce": torch.full((2, 4), 0.25)}
    out = linf_pgd(lambda w: (c * w["normal"]).sum() + (c * w["reduce"]).sum(), base, eps=1.0,
                   steps=7, gen=step_generator(0, 0, torch.device("cpu")))
    torch.testing.assert_close(out["normal"], F.one_hot(c.argmax(1), 4).float())
    # on a supernet: PGD's loss beats random perturbations of the same radius
    cfg = tiny_cfg(**{"strategy.name": "sdarts_adv"})
    model, _, _, strat = make(cfg)
    x, y = batch(n=8, seed=3)
    with torch.no_grad():
        model.alphas_normal.normal_(0, 1)
        model.alphas_reduce.normal_(0, 1)
    base = {k: v.detach() for k, v in model.arch_weights().items()}
    loss = lambda w: F.cross_entropy(model(x, w), y)
    adv = linf_pgd(loss, base, 0.3, 7, step_generator(0, 1, torch.device("cpu")))
    from dsrna_dist.strategies.perturb import uniform_noise

    with torch.no_grad():
        rand = [loss(uniform_noise(base, 0.3, step_generator(0, 10 + i, torch.device("cpu"))))
                for i in range(8)]
        assert loss(adv) > max(rand) and loss(adv) > loss(base)
    for k in ("normal", "reduce"):
        assert torch.all(adv[k] >= 0) and torch.allclose(adv[k].sum(-1), torch.ones(adv[k].shape[0]))


def test_sdarts_rs_perturbation_deterministic_and_on_simplex():
    cfg = tiny_cfg(**{"strategy.name": "sdarts_rs", "sdarts.perturb_eps": 0.1,
                      "sdarts.perturb_eps_max": 0.1})
    model, _, _, strat = make(cfg)
    x, y = batch()
    a = strat.perturbation(x, y, epoch=0, step=5)
    b = strat.perturbation(x, y, epoch=0, step=5)
    c = strat.perturbation(x, y, epoch=0, step=6)
    base = model.arch_weights()["normal"].detach()
    assert torch.equal(a["normal"], b["normal"]) and not torch.equal(a["normal"], c["normal"])
    assert torch.allclose(a["normal"].sum(-1), torch.ones(base.shape[0]))
    # before renormalisation every entry moved by at most eps, so after it the change is bounded
    assert 0 < (a["normal"] - base).abs().max() < 0.1 * 2 + 1e-6
    assert ramp_eps(0.03, 0.3, 0, 50) == 0.03 and math.isclose(ramp_eps(0.03, 0.3, 25, 50), 0.165)


@pytest.mark.parametrize("name,extra", [
    ("darts", {}), ("darts", {"strategy.order": 2}), ("sdarts_rs", {}), ("sdarts_adv", {}),
    ("pcdarts", {"model.partial_channels": 2, "model.edge_normalization": True}),
    ("pcdarts_adv", {"model.partial_channels": 2, "model.edge_normalization": True}),
])
def test_every_strategy_steps_and_moves_alpha_and_weights(name, extra):
    cfg = tiny_cfg(**{"strategy.name": name, **extra})
    model, _, _, strat = make(cfg)
    arch0 = [p.detach().clone() for p in model.arch_parameters()]
    w0 = [p.detach().clone() for p in model.weight_parameters()]
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    logs = strat.step(xt, yt, xv, yv, epoch=0, step=0, lr=0.05)
    assert {"train_loss", "val_loss"} <= set(logs) and all(math.isfinite(v) for v in logs.values())
    assert all(not torch.equal(a, p) for a, p in zip(arch0, model.arch_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(w0, model.weight_parameters()))


def test_arch_start_epoch_delays_arch_updates():
    cfg = tiny_cfg(**{"strategy.arch_start_epoch": 2})
    model, _, _, strat = make(cfg)
    arch0 = [p.detach().clone() for p in model.arch_parameters()]
    xt, yt = batch(seed=1)
    logs = strat.step(xt, yt, xt, yt, epoch=1, step=0, lr=0.05)
    assert "val_loss" not in logs and all(torch.equal(a, p) for a, p in zip(arch0, model.arch_parameters()))
    strat.step(xt, yt, xt, yt, epoch=2, step=1, lr=0.05)
    assert not torch.equal(arch0[0], model.alphas_normal)


def test_non_finite_loss_stops_without_touching_weights():
    model, _, _, strat = make(tiny_cfg())
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    w0 = [p.detach().clone() for p in model.weight_parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        strat.weight_step(x, y, epoch=0, step=0)
    assert all(torch.equal(a, p) for a, p in zip(w0, model.weight_parameters()))


def test_cosine_lr_matches_torch_scheduler():
    cfg = tiny_cfg(**{"optim.lr": 0.025, "optim.lr_min": 0.001})
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.025)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.001)
    for e in range(50):
        assert math.isclose(lr_at(cfg.optim, e, 0, 10, 50), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- 2 ranks (gloo)
DIST_CASES = [
    ("darts", {}), ("darts", {"strategy.order": 2}),
    ("pcdarts", {"model.partial_channels": 2, "model.edge_normalization": True}),
    ("sdarts_adv", {"sdarts.adv_steps": 2}),
    # DSRNA through the strategy: BN statistics captured from the objective's forward
    ("pcdarts", {"model.partial_channels": 2, "model.edge_normalization": True,
                 "robustness.name": "certified", "robustness.certified.reduction": "mean_margin",
                 "robustness.batch_fraction": 0.5, "robustness.gamma": 1e-3, "robustness.certified.eps_every": 2}),
    ("pcdarts", {"model.partial_channels": 2, "model.edge_normalization": True,
                 "robustness.name": "jacobian", "robustness.norm": "2",
                 "robustness.jacobian.estimator": "frobenius_sq_fd", "robustness.gamma": 10.0}),
]


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dsrna_dist.search import wrap_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {}
    for name, extra in DIST_CASES:
        cfg = tiny_cfg(**{"strategy.name": name, **extra})
        torch.manual_seed(0)  # same init on every rank, as setup_runtime does
        model = Supernet(cfg.model, info())
        from dsrna_dist.search import build_optimizers

        from dsrna_dist.robustness import build_metric

        w_opt, a_opt = build_optimizers(cfg, model)
        net = wrap_ddp(model, world)
        metric = build_metric(cfg.robustness)
        if metric is not None and hasattr(metric, "generator"):
            metric.generator = torch.Generator().manual_seed(rank)   # each rank its own draws
        strat = build_strategy(SearchContext(cfg=cfg, model=model, net=net, w_optim=w_opt,
                                             a_optim=a_opt, seed=cfg.run.seed, metric=metric))
        arch0 = [p.detach().clone() for p in model.arch_parameters()]
        for step in range(2):
            xt, yt = batch(seed=100 * rank + 2 * step)  # every rank sees different data
            xv, yv = batch(seed=100 * rank + 2 * step + 1)
            if step == 0:  # the local arch gradients differ across ranks (else the test is moot)
                local = torch.autograd.grad(F.cross_entropy(model(xv), yv), model.arch_parameters())
                gl = [torch.zeros_like(local[0]) for _ in range(world)]
                dist.all_gather(gl, local[0].contiguous())
                report[f"{name}{extra}/local_grads_differ"] = not torch.equal(gl[0], gl[1])
            strat.step(xt, yt, xv, yv, epoch=0, step=step, lr=0.05)
        for label, tensors in (("arch", model.arch_parameters()), ("weights", model.weight_parameters())):
            same = True
            for t in tensors:
                gathered = [torch.zeros_like(t) for _ in range(world)]
                dist.all_gather(gathered, t.detach().contiguous())
                same &= all(torch.equal(gathered[0], g) for g in gathered[1:])
            report[f"{name}{extra}/{label}_identical"] = same
        report[f"{name}{extra}/arch_moved"] = all(not torch.equal(a, p) for a, p in zip(arch0, model.arch_parameters()))
        if metric is not None:
            states = [None] * world
            dist.all_gather_object(states, metric.state_dict())
            report[f"{name}{extra}/metric_state_identical"] = states[0] == states[1]
    from dsrna_dist.engine.sync import any_rank

    report["any_rank_one_true"] = any_rank(rank == 1)      # True on both ranks
    report["any_rank_none_true"] = not any_rank(False)
    report["world_size"] = dist.get_world_size()
    if rank == 0:
        import json

        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f)
    from dsrna_dist.engine.runtime import teardown

    teardown(None, 0, hard_exit=True)  # barrier, destroy, os._exit: gloo can abort at interpreter exit


@pytest.mark.dist
def test_two_ranks_keep_alpha_and_weights_bit_identical(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report.pop("world_size") == 2
    bad = [k for k, v in report.items() if v is not True]
    assert not bad, bad


# --------------------------------------------------------------------------- the stage (CLI)
TINY_ARGS = tiny_search_args(layers=3)


def run_cli(args, tmp_path, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return run_proc([sys.executable, "-m", "dsrna_dist.search", *args, f"--run.out_dir={tmp_path}"],
                    env=env, timeout=600)


def test_cli_help_and_bad_key(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.returncode == 0 and "--strategy.name" in r.stdout and "--model.partial_channels" in r.stdout
    r = run_cli(["--strategy.nmae=darts"], tmp_path)
    assert r.returncode == 2 and "strategy.nmae" in r.stderr and "Traceback" not in r.stderr
    r = run_cli([*TINY_ARGS, "--strategy.name=pcdarts", "--run.name=bad"], tmp_path)
    assert r.returncode == 2 and "model.partial_channels" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["--data.name=cifar10", f"--data.root={tmp_path / 'nowhere'}", "--run.name=nodata"], tmp_path)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "bad").exists()  # nothing written


RESUME_ARGS = [*TINY_ARGS, "--epochs=2", "--strategy.name=sdarts_rs", "--run.log_every=1"]


@pytest.fixture(scope="module")
def full_search(tmp_path_factory):
    """One uninterrupted 2-epoch search (3 steps each), the reference of the resume tests."""
    out = tmp_path_factory.mktemp("search")
    full = run_cli([*RESUME_ARGS, "--run.name=full"], out)
    assert full.returncode == 0, full.stderr[-2000:]
    return out / "full"


def test_killed_search_resumes_to_the_same_result(tmp_path, full_search):
    """A run killed mid-epoch 1 and restarted ends bit-identical to an uninterrupted run."""
    args = RESUME_ARGS
    killed = run_cli([*args, "--run.name=resumed"], tmp_path, {"DSRNA_STOP_AFTER_STEPS": "4"})
    assert killed.returncode != 0
    part = tmp_path / "resumed"
    assert not (part / "genotype.json").exists()
    assert torch.load(part / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = run_cli([*args, "--run.name=resumed"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a = torch.load(full_search / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name in ("genotype.json", "alphas.jsonl", "genotypes/epoch_000.json", "genotypes/epoch_001.json"):
        assert (full_search / name).read_text() == (part / name).read_text(), name
    hist = [json.loads(line) for line in (part / "alphas.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[-1]["alphas_normal"] == a["model"]["arch.alphas_normal"].tolist()
    # TensorBoard: losses, lr, throughput, the alpha heatmap and the genotype text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(full_search / "tb"), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"epoch/train_loss", "epoch/val_loss", "epoch/lr", "epoch/throughput_img_per_s",
            "step/train_loss"} <= set(tags["scalars"])
    assert "arch/weights" in tags["images"]
    assert any(t.startswith("arch/genotype") for t in tags["tensors"])


def test_arch_state_reset_equals_clearing_the_checkpoint_between_epochs(tmp_path, full_search):
    """``arch_optim.reset_state_at=[1]`` is the diagnostic it replaces (results/diag/diag_adam.sh):
    kill the search after epoch 0's checkpoint, clear the arch optimizer's state in it, resume.
    Both end bit-identical, and differ from the search without the reset."""
    args = RESUME_ARGS
    r = run_cli([*args, "--arch_optim.reset_state_at=[1]", "--run.name=reset"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "arch optimizer state cleared" in r.stdout + r.stderr
    killed = run_cli([*args, "--run.name=manual"], tmp_path, {"DSRNA_STOP_AFTER_STEPS": "4"})
    assert killed.returncode != 0
    ck = tmp_path / "manual" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 1 and state["optimizers"]["arch"]["state"]  # Adam has state to clear
    state["optimizers"]["arch"]["state"] = {}
    torch.save(state, ck)
    resumed = run_cli([*args, "--run.name=manual"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = {n: torch.load(d / "checkpoints" / "last.pt", weights_only=True) for n, d in
             (("plain", full_search), ("reset", tmp_path / "reset"), ("manual", tmp_path / "manual"))}
    for k in ("arch.alphas_normal", "arch.alphas_reduce"):
        assert torch.equal(final["reset"]["model"][k], final["manual"]["model"][k]), k
        assert not torch.equal(final["reset"]["model"][k], final["plain"]["model"][k]), k
    from dsrna_dist.search import check_config

    for bad in ((0,), (1, 2)):  # epoch 0 has no state; a 2-epoch search has no epoch 2
        with pytest.raises(ConfigError, match="arch_optim.reset_state_at"):
            check_config(tiny_cfg(**{"epochs": 2, "arch_optim.reset_state_at": bad}))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # epoch 0 trains normally; epoch 1's lr (x1e38) blows the weights up within two steps
    args = [*TINY_ARGS, "--epochs=3", "--optim.schedule=step", "--optim.step_gamma=1e38",
            "--optim.grad_clip=0", "--run.name=nan"]
    r = run_cli(args, tmp_path)
    assert r.returncode == 1 and "non-finite" in (r.stdout + r.stderr)
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "genotype.json").exists()


# The robustness term inside the arch step (estimators, trade-off modes, 2nd order, 2 ranks) is
# tested against independent autograd gradients in tests/test_tradeoff.py.


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["darts_2nd", "pcdarts_adv"])
def test_accelerate_launch_two_ranks_end_to_end(tmp_path, strategy):
    """The real launcher command: 2 gloo ranks, alpha checked identical every epoch."""
    import shutil

    extra = {"darts_2nd": ["--strategy.order=2"],
             "pcdarts_adv": ["--strategy.name=pcdarts_adv", "--model.partial_channels=2",
                             "--model.edge_normalization=true", "--sdarts.adv_steps=2"]}[strategy]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "dsrna_dist.search",
           *TINY_ARGS, "--epochs=2", "--data.batch_size=4", *extra, "--run.name=ddp",
           f"--run.out_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "world_size=2" in out and out.count("alpha identical on 2 ranks") == 2
    assert (tmp_path / "ddp" / "genotype.json").is_file()
