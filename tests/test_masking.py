"""Gradient-masking checks: each check is fed a model built to mask gradients in the way the
check looks for and must flag it; the same network without the masking layer must pass every
check. The records come from evaluate's own attack plan and record writer (build_attacks,
attack_records, summarize), so what is tested is what ``evaluate`` writes to summary.json."""
import math

import pytest
import torch
from torch import nn

from dsrna_dist.config import EvalConfig, load_config
from dsrna_dist.evaluate import attack_records, build_attacks, summarize
from dsrna_dist.space.layers import Normalize

torch.set_num_threads(1)
N = 100


def _small_cnn(k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.5, 0.4], [0.25, 0.3]), nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, k))


@pytest.fixture(scope="module")
def net():
    """A small CNN trained on a separable synthetic task: PGD at eps 0.05 breaks about 2/3 of it."""
    g = torch.Generator().manual_seed(1)
    n, k = 480, 4
    y = torch.arange(n) % k
    protos = torch.rand(k, 2, 8, 8, generator=g)
    x = (protos[y] * 0.5 + 0.25 + 0.12 * torch.randn(n, 2, 8, 8, generator=g)).clamp(0, 1)
    model = _small_cnn(k)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, n - 200, 40):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 40]), y[i:i + 40]).backward()
            opt.step()
    return model.eval(), x[-N:]


# ----------------------------------------------------------------------------- masking models
class Quantise(nn.Module):
    """Non-differentiable input quantisation (round to L levels): the input gradient is exactly 0."""

    def __init__(self, m: nn.Module, levels: int = 4):
        super().__init__()
        self.m, self.levels = m, levels

    def forward(self, x):
        return self.m(torch.round(x * self.levels) / self.levels)


class DetectAndRound(nn.Module):
    """A "detect and purify" defence: inputs off the data grid (some pixel farther than tau from
    a multiple of 1/L) are rounded back onto it through a zero-gradient path. Within eps < tau
    PGD attacks the bare network; at larger eps its random start is off the grid, rounds back to
    the clean image and has no gradient: robust accuracy *rises* with eps."""

    def __init__(self, m: nn.Module, levels: int = 2, tau: float = 0.06):
        super().__init__()
        self.m, self.levels, self.tau = m, levels, tau

    def forward(self, x):
        q = torch.round(x * self.levels) / self.levels
        off = ((x - q).abs().flatten(1).amax(1) > self.tau).view(-1, 1)
        return torch.where(off, self.m(q.detach()), self.m(x))


class GradientTrap(nn.Module):
    """Shattered gradients: x + a sin(2 pi x / P) with a 2 pi / P = 1.5, so d/dx changes sign in
    narrow bands of every period P. Small PGD steps (<< P) get trapped at the band edges, large
    ones step over them: PGD-50 (step 2.5 eps / 50) is weaker than PGD-10 and than FGSM."""

    def __init__(self, m: nn.Module, period: float = 0.01, k: float = 1.5):
        super().__init__()
        self.m, self.a, self.w = m, k * period / (2 * math.pi), 2 * math.pi / period

    def forward(self, x):
        return self.m(x + self.a * torch.sin(self.w * x))


# ----------------------------------------------------------------------------- harness
def checks_of(model: nn.Module, x: torch.Tensor, eps: float = 0.05, sweep=(0.0, 0.02, 0.05, 0.1), **masking):
    """summary.json's masking block for ``model`` on ``x`` (labels = its own clean predictions,
    so every example starts correctly classified and every attack has work to do)."""
    over = {"data.name": "synthetic", "attacks": [{"name": "fgsm", "eps": eps},
                                                  {"name": "pgd", "eps": eps, "steps": 20, "step_size": eps / 4}],
            "eps_sweep": list(sweep), "sweep_attack": {"name": "pgd", "steps": 10, "step_size": 0},
            "masking.num_examples": 0, "masking.steps": [10, 50], "masking.restarts": 3,
            "masking.blackbox_queries": 300, "masking.huge_steps": 20}
    over.update({f"masking.{k}": v for k, v in masking.items()})
    cfg = load_config(EvalConfig, None, over)
    attacks, sweep_label = build_attacks(cfg)
    with torch.no_grad():
        y = model(x).argmax(1)
    recs = attack_records(model, attacks, x, y, list(range(len(x))), 50)
    s = summarize(recs, [], attacks, sweep_label, cfg.masking)
    return {c["check"]: c for c in s["masking"]["checks"]}, s


@pytest.fixture(scope="module")
def normal(net):
    return checks_of(*net)


@pytest.fixture(scope="module")
def quantised(net):
    model, x = net
    return checks_of(Quantise(model).eval(), x)


def test_normal_model_raises_no_flag(normal):
    checks, s = normal
    assert {c: v["status"] for c, v in checks.items()} == {
        "eps_monotone": "ok", "huge_eps": "ok", "effort": "ok", "blackbox": "ok"}, checks
    assert not s["masking"]["flagged"] and not s["masking"]["warnings"]
    # strength where it matters: the attacks really break this network, and the pairs were compared
    assert s["robust_acc"]["PGD-20"] < 60 and checks["effort"]["pairs"] >= 6 and checks["blackbox"]["pairs"] >= 2
    assert checks["huge_eps"]["acc"] == 0.0
    assert [p["eps"] for p in checks["eps_monotone"]["points"]] == [0.0, 0.02, 0.05, 0.1]


def test_huge_eps_check_flags_a_quantised_input(quantised):
    checks, _ = quantised
    c = checks["huge_eps"]
    assert c["status"] == "flagged" and c["acc"] > 10 and "eps 1" in c["message"]


def test_blackbox_check_flags_a_quantised_input(quantised):
    checks, s = quantised
    c = checks["blackbox"]
    assert c["status"] == "flagged", checks
    assert c["blackbox"] == "mask/Square-300" and c["acc_whitebox"] - c["acc_blackbox"] > 20
    assert c["message"] in s["masking"]["warnings"]


def test_eps_monotone_check_flags_detect_and_round(net):
    model, x = net
    xg = torch.round(x * 2) / 2   # data on the grid the defence rounds to
    checks, s = checks_of(DetectAndRound(model).eval(), xg)
    c = checks["eps_monotone"]
    assert c["status"] == "flagged", c
    accs = [p["acc"] for p in c["points"]]
    assert accs[-1] > min(accs) + 30 and "rises with eps" in c["message"]
    plain, _ = checks_of(model, xg)   # the same network on the same grid data: monotone
    assert plain["eps_monotone"]["status"] == "ok"


def test_effort_check_flags_shattered_gradients(net):
    model, x = net
    # period 0.02: FGSM's one step of 0.1 and PGD-10's steps of 0.025 jump the bands, PGD-50's 0.005 do not
    checks, s = checks_of(GradientTrap(model, period=0.02).eval(), x, eps=0.1, sweep=(), blackbox_queries=0)
    c = checks["effort"]
    assert c["status"] == "flagged", c
    assert c["acc_stronger"] - c["acc_weaker"] > 20 and "more effort helps" in c["message"]
    acc = s["masking_attacks_acc"]
    assert acc["mask/PGD-50"] > acc["mask/PGD-10"] + 5, acc   # more steps, higher accuracy
    plain, _ = checks_of(model, x, eps=0.1, sweep=(), blackbox_queries=0)
    assert plain["effort"]["status"] == "ok", plain["effort"]


def test_restarted_check_pgd_starts_where_the_plain_one_does(net):
    """The effort attacks share one seed: restart 0 of PGD-50x3 is PGD-50, so on a deterministic
    model the restarted attack can only be stronger, example by example."""
    model, x = net
    cfg = load_config(EvalConfig, None, {"data.name": "synthetic", "masking.steps": [10, 50],
                                         "masking.restarts": 3, "attacks": [{"name": "pgd", "eps": 0.05}]})
    attacks, _ = build_attacks(cfg)
    by = {lab: a for lab, a, _ in attacks}
    one, many = by["mask/PGD-50"], by["mask/PGD-50x3"]
    assert one.seed == many.seed
    with torch.no_grad():
        y = model(x).argmax(1)
    idx = list(range(len(x)))
    with torch.no_grad():
        ok1 = model(one(model, x, y, idx)).argmax(1) == y
        ok3 = model(many(model, x, y, idx)).argmax(1) == y
    assert not (ok3 & ~ok1).any() and (ok1 & ~ok3).any()


def test_checks_compare_on_common_examples_and_respect_tolerance():
    """Hand-made records: a check attack run on a prefix is compared with the others on that
    prefix only; a wrong-way difference within the tolerance does not flag."""
    from dsrna_dist.attacks.masking import run_checks

    meta = {"clean": {"name": "clean", "eps": 0.0, "norm": "inf", "sweep": False},
            "PGD-10": {"name": "pgd", "eps": 0.1, "norm": "inf", "sweep": False, "steps": 10, "restarts": 1},
            "mask/PGD-50": {"name": "pgd", "eps": 0.1, "norm": "inf", "sweep": False, "steps": 50, "restarts": 1,
                            "role": "effort"}}
    attacks = [(k, None, m) for k, m in meta.items()]

    def recs(correct):
        return [{"index": i, "attack": lab, "correct": c} for lab, cs in correct.items() for i, c in enumerate(cs)]

    # PGD-10 breaks examples 0-4 and nothing after; PGD-50 runs on 0-9 and breaks 0-4 too
    base = {"clean": [True] * 100, "PGD-10": [False] * 5 + [True] * 95, "mask/PGD-50": [False] * 5 + [True] * 5}
    out = run_checks(recs(base), attacks, tolerance=1.0, tolerance_examples=0)
    eff = next(c for c in out["checks"] if c["check"] == "effort")
    assert eff["status"] == "ok" and eff["n"] == 10 and eff["worst_pp"] == 0.0
    worse = dict(base, **{"mask/PGD-50": [False] * 4 + [True] * 6})   # one example more survives PGD-50
    out = run_checks(recs(worse), attacks, tolerance=1.0, tolerance_examples=0)
    assert out["flagged"] == ["effort"]
    out = run_checks(recs(worse), attacks, tolerance=1.0, tolerance_examples=1)   # 1 of 10 = 10 pp allowed
    assert out["flagged"] == []


def test_effort_compares_only_attacks_that_reach_as_far():
    """More steps with a much smaller step size walk less far (PGD-20 at eps/4: 5 eps; PGD-50 at
    2.5 eps/50: 2.5 eps): such a pair is not evidence of masking and is not compared; the same
    accuracies with an equal or longer reach still flag (measured: on one CPU the normal test
    net's PGD-20 at eps/4 beat the check's PGD-50 by 5 pp)."""
    from dsrna_dist.attacks.masking import run_checks

    def meta(ss50):
        return {"clean": {"name": "clean", "eps": 0.0, "norm": "inf", "sweep": False},
                "PGD-20": {"name": "pgd", "eps": 0.1, "norm": "inf", "sweep": False, "steps": 20, "restarts": 1,
                           "step_size": 0.025},
                "mask/PGD-50": {"name": "pgd", "eps": 0.1, "norm": "inf", "sweep": False, "steps": 50,
                                "restarts": 1, "step_size": ss50, "role": "effort"}}
    correct = {"clean": [True] * 20, "PGD-20": [False] * 10 + [True] * 10, "mask/PGD-50": [False] * 8 + [True] * 12}
    recs = [{"index": i, "attack": lab, "correct": c} for lab, cs in correct.items() for i, c in enumerate(cs)]
    short = run_checks(recs, [(k, None, m) for k, m in meta(0.005).items()], tolerance=1.0, tolerance_examples=0)
    assert short["flagged"] == [] and next(c for c in short["checks"] if c["check"] == "effort")["status"] == "skipped"
    far = run_checks(recs, [(k, None, m) for k, m in meta(0.01).items()], tolerance=1.0, tolerance_examples=0)
    assert far["flagged"] == ["effort"]  # 50 x 0.01 = 5 eps, as far as PGD-20: a real wrong-way pair
