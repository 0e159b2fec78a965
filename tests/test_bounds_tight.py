"""Tighter certification (issue 16 items 1, 2, 4): l_2 ball at the affine prefix, merged ReLUs,
the margin folded into the last Linear for IBP, the CNN-Cert max-pool relaxation, radius search
to a relative tolerance with warm starts and bound reuse. Every gain is checked sound against
sampling and PGD, and at least as tight as the switch turned off on every example; the radii
are checked against the smallest eps a strong PGD breaks on a trained net."""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from dsrna_dist.bounds.evaluation import certify_batch, min_adversarial_eps
from dsrna_dist.bounds import BoundedModel, certified_radius
from dsrna_dist.space.layers import Normalize
from dsrna_dist.space.ops import build_op
from test_bounds import assert_sound, randomize

torch.set_num_threads(1)
DT = torch.float64
ALL = ("ibp", "crown-ibp", "crown")


def _cnn(seed: int, pool: bool = True, c: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    layers = [Normalize((0.5,), (0.25,)), nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.MaxPool2d(3, 2, 1)] if pool else [nn.AvgPool2d(2)]
    layers += [build_op("sep_conv_3x3", c, 1, True), nn.ReLU(), nn.Flatten(), nn.Linear(c * 16, 3)]
    return randomize(nn.Sequential(*layers), seed).to(DT).eval()


def _darts(layers: int = 3, size: int = 8, genotype: str = "PC_DARTS") -> nn.Module:
    from dsrna_dist.config import NetworkConfig
    from dsrna_dist.space.network import build_network
    torch.manual_seed(0)
    info = types.SimpleNamespace(name="synthetic", image_size=size, in_channels=1, num_classes=4,
                                 mean=(0.5,), std=(0.25,))
    net = build_network(NetworkConfig(genotype=genotype, init_channels=4, layers=layers, auxiliary=False),
                        genotype, info)
    return net.to(DT).eval()


def _trained_cnn(seed: int = 0):
    """A small CNN fitted (~95% train accuracy) to a random teacher on 8x8 images in [0, 1]:
    natural training, decisions inside the input range, so radii are finite and nonzero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 8, 8, generator=g, dtype=DT)
    teacher = torch.randn(3, 64, generator=g, dtype=DT)
    y = ((x.flatten(1) - 0.5) @ teacher.T).argmax(1)
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(128, 3)).to(DT)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    assert ok.double().mean() > 0.85
    return net, x[ok][:8], y[ok][:8]


def _margin(bm, x, y, eps, norm, method):
    m = bm.margin_lower_bound(x, y, eps, norm, method)
    return m.scatter(1, y[:, None], math.inf).min(1).values


# ----------------------------------------------------------------------------- item 1: l_2 ball
@pytest.mark.parametrize("kind", ["cnn", "darts"])
def test_l2_ball_sound_and_strictly_tighter_than_the_box(kind):
    net = _cnn(1) if kind == "cnn" else _darts(layers=2)
    size = 8
    x = torch.rand(4, 1, size, size, dtype=DT)
    eps = 0.3
    new = BoundedModel(net)
    assert_sound(net, x, eps, "2", bm=new, n_samples=48, pgd_steps=15,
                 methods=ALL if kind == "cnn" else ("ibp", "crown-ibp"))
    old = BoundedModel(net, l2_ball=False)
    y = net(x).argmax(1)
    for method in ("ibp", "crown-ibp"):
        lo_n, up_n = new.bounds(x, eps, "2", method)
        lo_o, up_o = old.bounds(x, eps, "2", method)
        assert (lo_n >= lo_o - 1e-9).all() and (up_n <= up_o + 1e-9).all()
        assert ((up_n - lo_n) < (up_o - lo_o) - 1e-9).all(), f"{method}: not strictly narrower on every logit"
        # the l_2 bound no longer equals the l_inf bound of the same radius (it did before)
        lo_i, up_i = new.bounds(x, eps, "inf", method)
        assert ((up_n - lo_n) < (up_i - lo_i)).all()
    # radii: strictly larger on every example for IBP and CROWN-IBP
    for method in ("ibp", "crown-ibp"):
        r_new = certified_radius(new, x, y, "2", method, steps=30, rel_tol=1e-3)
        r_old = certified_radius(old, x, y, "2", method, steps=30, rel_tol=1e-3)
        assert (r_old > 0).all()
        assert (r_new > r_old * 1.01).all(), (method, r_new, r_old)


def test_l2_ball_is_exact_on_a_linear_prefix():
    """Normalize -> conv -> BN: the bound is the image of the ball, eps ||J_row||_2, attained."""
    torch.manual_seed(3)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3),
                        nn.Flatten())
    net = randomize(net, 3).to(DT).eval()
    x = torch.full((1, 1, 5, 5), 0.5, dtype=DT)  # centre of the range: eps 0.2 ball stays inside
    eps = 0.2
    lo, up = BoundedModel(net).bounds(x, eps, "2", "ibp")
    J = torch.autograd.functional.jacobian(lambda z: net(z.view(1, 1, 5, 5)).flatten(), x.flatten())
    c = net(x).flatten()
    torch.testing.assert_close(up[0], c + eps * J.norm(dim=1))
    torch.testing.assert_close(lo[0], c - eps * J.norm(dim=1))


# ----------------------------------------------------------------------------- item 2: for free
def test_merged_relus_sound_and_never_looser():
    net = _darts(layers=1, genotype="DARTS_V2")
    merged, plain = BoundedModel(net), BoundedModel(net, merge_relus=False)
    assert merged.merged_relus > 0
    assert len(merged.nodes) == len(plain.nodes) - merged.merged_relus
    x = torch.rand(2, 1, 8, 8, dtype=DT)
    assert_sound(net, x, 0.02, "inf", bm=merged, n_samples=32, pgd_steps=10, restarts=1)
    for method in ALL:
        lo_m, up_m = merged.bounds(x, 0.02, "inf", method)
        lo_p, up_p = plain.bounds(x, 0.02, "inf", method)
        assert (lo_m >= lo_p - 1e-9).all() and (up_m <= up_p + 1e-9).all(), method
        if method == "ibp":
            torch.testing.assert_close(lo_m, lo_p)
        else:
            assert (lo_m > lo_p + 1e-9).any() or (up_m < up_p - 1e-9).any(), f"{method}: merging changed nothing"


def test_ibp_margin_folded_into_last_linear():
    net = _cnn(2, pool=False)
    x = torch.rand(5, 1, 8, 8, dtype=DT)
    y = net(x).argmax(1)
    fold, flat = BoundedModel(net), BoundedModel(net, fold_spec=False)
    for norm, eps in (("inf", 0.05), ("2", 0.3)):
        mf, mp = _margin(fold, x, y, eps, norm, "ibp"), _margin(flat, x, y, eps, norm, "ibp")
        assert (mf >= mp - 1e-9).all() and (mf > mp + 1e-9).all()
        # sound: below the smallest margin over sampled and PGD points (logit bounds of C @ f)
        C = torch.eye(3, dtype=DT)[y][:, None, :] - torch.eye(3, dtype=DT)[None]  # [B, 3, 3]
        lb, _ = fold.bounds(x, eps, norm, "ibp", C=C)
        for j in range(3):
            f = lambda z, j=j: (net(z) * C[:, j].repeat_interleave(z.shape[0] // x.shape[0], 0)).sum(1, keepdim=True)  # noqa: E731
            from test_bounds import pgd_extremes
            lo, _ = pgd_extremes(f, x, eps, norm, steps=15, restarts=1, gen=torch.Generator().manual_seed(j))
            assert (lb[:, j] <= lo[:, 0] + 1e-9).all()


def test_cnn_cert_max_pool_sound_and_best_never_looser():
    net = _cnn(4, pool=True)
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    eps = 0.04
    cert = BoundedModel(net, max_pool="cnn-cert")
    assert_sound(net, x, eps, "inf", methods=("crown-ibp", "crown"), bm=cert, n_samples=48, pgd_steps=15)
    best, cheap = BoundedModel(net, max_pool="best"), BoundedModel(net, max_pool="cheap")
    gains = 0
    for method in ("crown-ibp", "crown"):
        lb, ub = best.bounds(x, eps, "inf", method)
        lc, uc = cheap.bounds(x, eps, "inf", method)
        ln, un = cert.bounds(x, eps, "inf", method)
        assert (lb >= lc - 1e-9).all() and (ub <= uc + 1e-9).all()
        if method == "crown-ibp":  # same intermediate bounds: best = the tighter of the two, exactly
            torch.testing.assert_close(lb, torch.maximum(lc, ln))
        gains += int((lb > lc + 1e-9).sum())
    assert gains > 0, "the CNN-Cert relaxation never helped: the test does not exercise it"


# ----------------------------------------------------------------------------- radius search
def test_rel_tol_radius_is_resolved_and_no_looser_than_fixed_steps():
    net = _cnn(5, pool=False)
    x = torch.rand(5, 1, 8, 8, dtype=DT)
    y = net(x).argmax(1)
    bm = BoundedModel(net)
    tol = 1e-3
    old = certified_radius(bm, x, y, "inf", "ibp", steps=12, eps_init=0.05)
    new = certified_radius(bm, x, y, "inf", "ibp", steps=60, eps_init=0.05, rel_tol=tol)
    assert (new > 0).all()
    assert (_margin(bm, x, y, new, "inf", "ibp") > 0).all()
    # IBP's margin bound is monotone in eps: nothing certifies just above the resolution
    assert (_margin(bm, x, y, new * (1 + 1.01 * tol), "inf", "ibp") <= 0).all()
    assert (new >= old).all()


def test_warm_start_and_reuse_are_sound():
    net, x, y = _trained_cnn(1)
    bm = BoundedModel(net)
    plain = certified_radius(bm, x, y, "inf", "crown", steps=40, rel_tol=1e-2, reuse=False)
    fast = certified_radius(bm, x, y, "inf", "crown", steps=40, rel_tol=1e-2,
                            lower=certified_radius(bm, x, y, "inf", "crown-ibp", steps=40, rel_tol=1e-2))
    for r in (plain, fast):
        assert (r > 0).all()
        assert (_margin(bm, x, y, r, "inf", "crown") > 0).all()  # a fresh pass certifies the radius
    assert (fast >= plain / 1.0201).all()
    # an upper hint (an attack's eps) caps the search; a radius never goes above it
    capped = certified_radius(bm, x, y, "inf", "crown", steps=40, rel_tol=1e-2, upper=plain * 0.5)
    assert (capped <= plain * 0.5).all() and (capped > 0).all()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_crown_radius_below_strong_pgd_and_methods_ordered(norm):
    """The independent reference of issue 16: on every example of a trained net, CROWN's
    radius is at most the smallest eps a strong PGD breaks, and CROWN >= CROWN-IBP >= IBP."""
    net, x, y = _trained_cnn(0)
    recs = certify_batch(BoundedModel(net), x, y, list(range(len(y))), methods=list(ALL), norms=[norm],
                         steps=40, eps_init=0.05, random_target=False, seed=0, num_classes=3, rel_tol=1e-3)
    r = {m: torch.tensor([d["radius"] for d in recs if d["method"] == m], dtype=DT) for m in ALL}
    adv = min_adversarial_eps(net, x, y, norm, eps_max=1.0 if norm == "inf" else 8.0, bisection_steps=14,
                              steps=60)
    assert torch.isfinite(adv).all() and (adv > 0).all()
    assert (r["crown"] > 0).all()
    assert (r["crown"] <= adv).all(), (r["crown"], adv)
    assert (r["crown"] >= r["crown-ibp"]).all() and (r["crown-ibp"] >= r["ibp"]).all()
    assert (r["crown"] > r["ibp"]).any()
