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


# ----------------------------------------------------------------------------- nearly tight references
# A soundness check bites only where the bound is nearly tight: on a naturally trained net the
# IBP radius is ~8% of the smallest eps PGD breaks (l_inf), so an IBP radius inflated 10x still
# passes "radius <= attack". The net below is certifiably trained, so every method's bound is
# close to the truth, and with one hidden layer the exact l_inf answer is a small MILP.
_CERTIFIED: dict = {}


def _certified_net(seed: int = 0):
    """One hidden layer (Normalize -> conv stride 2 -> BN -> ReLU -> Linear) fitted by IBP
    training, l_inf eps 0.04 and l_2 eps 0.2 at once (ramped over the first half, CE + IBP loss),
    to the random teacher of :func:`_trained_cnn` on the inputs at l_inf distance > 0.04 from the
    teacher's boundary (so a robust classifier exists); 8 correctly classified training inputs.
    Measured on them (rel_tol 1e-3 radii / the smallest eps a strong PGD breaks): IBP 0.91-0.96
    (l_inf) and 0.40-0.60 (l_2), CROWN-IBP 0.72-0.99 and 0.59-0.97; at each l_inf radius the exact
    minimum margin is 0.4-29% of the clean one, at twice the radius it is negative on every
    example (MILP). Cached (trained in ~1-3 s)."""
    if seed in _CERTIFIED:
        return _CERTIFIED[seed]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(512, 1, 8, 8, generator=g, dtype=DT)
    teacher = torch.randn(3, 64, generator=g, dtype=DT)
    s = (x.flatten(1) - 0.5) @ teacher.T
    y = s.argmax(1)
    dist = (s.gather(1, y[:, None]) - s) / (teacher[y][:, None, :] - teacher[None]).abs().sum(-1).clamp(min=1e-12)
    keep = dist.scatter(1, y[:, None], math.inf).min(1).values > 0.04
    x, y = x[keep][:128], y[keep][:128]
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3)).to(DT)
    bm = BoundedModel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    steps = 80
    for step in range(steps):
        frac = min(1.0, 2 * step / steps)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        if frac > 0:
            rob = sum(nn.functional.cross_entropy(-bm.margin_lower_bound(x, y, e * frac, norm, "ibp"), y)
                      for norm, e in (("inf", 0.04), ("2", 0.2)))
            loss = 0.5 * loss + 0.25 * rob
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    assert ok.double().mean() > 0.85
    _CERTIFIED[seed] = (net, x[ok][:8], y[ok][:8])
    return _CERTIFIED[seed]


def _spec(y: torch.Tensor, k: int, target=None, mean: bool = False) -> torch.Tensor:
    """C [B, S, K]: rows e_y - e_j for every j != y, the row e_y - e_target, or (``mean``) the one
    row e_y - mean_{j != y} e_j."""
    eye = torch.eye(k, dtype=DT)
    if target is not None:
        return (eye[y] - eye[target])[:, None]
    rows = eye[y][:, None] - eye[None]                                   # [B, K, K], row y is 0
    others = torch.stack([torch.arange(k)[torch.arange(k) != int(t)] for t in y])
    rows = rows.gather(1, others[:, :, None].expand(-1, -1, k))
    return rows.mean(1, keepdim=True) if mean else rows


def _attained(net, x, C, eps, norm, steps=40, restarts=2, seed=0):
    """[B, S]: the smallest value of each spec row C [B, S, K] . f(x') that PGD finds (every
    iterate counts; restart 0 from the clean point, then uniform random starts) on the ball of
    radius ``eps`` (scalar or [B]) clipped to [0, 1]: values a sound lower bound must not exceed."""
    B, S, K = C.shape
    shape = (-1,) + (1,) * (x.dim() - 1)
    e = torch.as_tensor(eps, dtype=x.dtype).expand(B).repeat_interleave(S).view(shape)
    xr, cr = x.repeat_interleave(S, 0), C.reshape(B * S, K)
    gen = torch.Generator().manual_seed(seed)

    def proj(z):
        d = z - xr
        if norm == "inf":
            d = torch.maximum(torch.minimum(d, e), -e)
        else:
            d = d * (e / d.flatten(1).norm(dim=1).clamp(min=1e-12).view(shape)).clamp(max=1.0)
        return (xr + d).clamp(0, 1)

    with torch.no_grad():
        best = (net(xr) * cr).sum(1)
    for r in range(restarts):
        xa = xr.clone() if r == 0 else proj(xr + (2 * torch.rand(xr.shape, generator=gen, dtype=x.dtype) - 1) * e)
        for _ in range(steps):
            xa.requires_grad_(True)
            v = (net(xa) * cr).sum(1)
            (g,) = torch.autograd.grad(v.sum(), xa)
            best = torch.minimum(best, v.detach())
            step = g.sign() if norm == "inf" else g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(shape)
            xa = proj(xa.detach() - 2.5 * e / steps * step)
        with torch.no_grad():
            best = torch.minimum(best, (net(xa) * cr).sum(1))
    return best.view(B, S)


def _adv_eps(net, x, C, norm, hi, iters=14, **kw):
    """[B]: the smallest eps (bisection on [0, hi], resolution hi / 2^iters) at which PGD drives
    some row of C . f to <= 0 (an adversarial example, or one for the target row); inf where it
    cannot at ``hi``. An upper bound of every sound certified radius."""
    B = x.shape[0]
    lo, up = torch.zeros(B, dtype=DT), torch.full((B,), float(hi), dtype=DT)
    found = _attained(net, x, C, up, norm, **kw).min(1).values <= 0
    for _ in range(iters):
        mid = (lo + up) / 2
        hit = _attained(net, x, C, mid, norm, **kw).min(1).values <= 0
        up, lo = torch.where(hit, mid, up), torch.where(hit, lo, mid)
    return torch.where(found, up, torch.full_like(up, math.inf))


def _exact_min(net, x, C, eps):
    """[B, S]: the exact minimum of each spec row C [B, S, K] . f(x') over the l_inf ball of
    radius ``eps`` (scalar or [B]) clipped to [0, 1], for ``net`` = affine prefix -> ReLU ->
    Flatten -> Linear (one hidden layer): a MILP per row (HiGHS; one binary per neuron the box
    leaves unstable, big-M from its exact pre-activation interval). Returned as the network's own
    value at the MILP's minimiser (moved into the ball): an attained value, so a sound bound is
    below it whatever the solver's tolerances, and the minimum up to them."""
    import numpy as np
    from scipy import optimize as opt  # a test dependency (pyproject [test]): not skipped, the teeth need it
    assert isinstance(net[-3], nn.ReLU) and isinstance(net[-2], nn.Flatten) and isinstance(net[-1], nn.Linear)
    pre, W2, b2 = net[:-3], net[-1].weight.detach().numpy(), net[-1].bias.detach().numpy()
    B, S, _ = C.shape
    eps = torch.as_tensor(eps, dtype=DT).expand(B)
    out = torch.empty(B, S, dtype=DT)
    for i in range(B):
        x0 = x[i].flatten()
        n = x0.numel()
        with torch.no_grad():
            A = torch.autograd.functional.jacobian(lambda v: pre(v.view(1, *x.shape[1:])).flatten(), x0).numpy()
            c = pre(x[i:i + 1]).flatten().numpy() - A @ x0.numpy()
        xl, xu = (x0 - eps[i]).clamp(0, 1).numpy(), (x0 + eps[i]).clamp(0, 1).numpy()
        zl = A @ ((xl + xu) / 2) + c - np.abs(A) @ ((xu - xl) / 2)
        zu = A @ ((xl + xu) / 2) + c + np.abs(A) @ ((xu - xl) / 2)
        h = A.shape[0]
        unstable = np.nonzero((zl < 0) & (zu > 0))[0]
        m = len(unstable)
        N = n + h + m                                        # variables: x', a = relu(z), one binary per unstable
        rows, lo, up = [], [], []
        lb = np.concatenate([xl, np.zeros(h + m)])
        ub = np.concatenate([xu, np.full(h, np.inf), np.ones(m)])
        for k in range(h):
            if zu[k] <= 0:
                ub[n + k] = 0.0                                  # a = 0
            elif zl[k] >= 0:                                     # a = z
                r = np.zeros(N)
                r[:n], r[n + k] = A[k], -1.0
                rows.append(r), lo.append(-c[k]), up.append(-c[k])
        for t, k in enumerate(unstable):                         # a >= z, a <= z - l (1 - d), a <= u d
            r = np.zeros(N)
            r[:n], r[n + k] = A[k], -1.0
            rows.append(r), lo.append(-np.inf), up.append(-c[k])
            r = np.zeros(N)
            r[:n], r[n + k], r[n + h + t] = -A[k], 1.0, -zl[k]
            rows.append(r), lo.append(-np.inf), up.append(c[k] - zl[k])
            r = np.zeros(N)
            r[n + k], r[n + h + t] = 1.0, -zu[k]
            rows.append(r), lo.append(-np.inf), up.append(0.0)
        integ = np.concatenate([np.zeros(n + h), np.ones(m)])
        cons = opt.LinearConstraint(np.array(rows), lo, up) if rows else None
        for s in range(S):
            cost = np.zeros(N)
            cost[n:n + h] = C[i, s].numpy() @ W2
            res = opt.milp(cost, constraints=cons, integrality=integ, bounds=opt.Bounds(lb, ub),
                           options={"mip_rel_gap": 1e-9})
            assert res.status == 0, res.message
            xs = torch.tensor(np.clip(res.x[:n], xl, xu), dtype=DT).view(1, *x.shape[1:])
            with torch.no_grad():
                out[i, s] = (net(xs)[0] * C[i, s]).sum()
            assert abs(float(out[i, s]) - (res.fun + float(C[i, s].numpy() @ b2))) < 1e-5  # the MILP models the net
    return out


# ----------------------------------------------------------------------------- item 1: l_2 ball
@pytest.mark.parametrize("kind", ["cnn", "darts", "certified"])
def test_l2_ball_sound_and_strictly_tighter_than_the_box(kind):
    """On the random-weight nets the l_2 bounds at eps 0.3 are far wider (17-73x) than what PGD
    attains, so the sampling / PGD check there cannot see an l_2 bound that is too tight by 2x;
    the certified net is where they are nearly tight: there each method's margin bound at its
    own l_2 radius (where it has given up its whole clean margin) is below the margin PGD attains
    and PGD takes a large share of that slack (and those radii are checked against the attack in
    test_radii_sound_and_nearly_tight_on_a_certified_net)."""
    if kind == "certified":
        net, x, _ = _certified_net()
    else:
        net = _cnn(1) if kind == "cnn" else _darts(layers=2)
        x = torch.rand(4, 1, 8, 8, dtype=DT)
    eps = 0.3
    new = BoundedModel(net)
    assert_sound(net, x, eps, "2", bm=new, n_samples=48, pgd_steps=15,
                 methods=ALL if kind != "darts" else ("ibp", "crown-ibp"))
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
    if kind != "certified":
        return
    C = _spec(y, 3)
    with torch.no_grad():
        clean = (net(x)[:, None] * C).sum(2).min(1).values
    for method in ALL:
        r = certified_radius(new, x, y, "2", method, steps=30, rel_tol=1e-3)
        b = _margin(new, x, y, r, "2", method)
        attained = _attained(net, x, C, r, "2").min(1).values
        assert (attained >= b).all(), (method, attained, b)
        share = (clean - attained) / (clean - b)
        assert (share >= _SHARE["2"][method]).all(), (method, share)


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
    radius is at most the smallest eps a strong PGD breaks, and CROWN >= CROWN-IBP >= IBP.

    The order is checked on radii searched *without* the warm start (certify_batch starts each
    method at the cheaper one's radius and keeps the larger, so there it holds by construction,
    even for a search that certifies nothing), each at the search's resolution 1 + rel_tol.
    On this naturally trained net only CROWN's radius is near the attack (measured 0.63-0.80 of
    it l_inf, 0.34-0.47 l_2; IBP 0.07-0.09 / 0.03): the IBP and CROWN-IBP radii are checked where
    they are nearly tight in test_radii_sound_and_nearly_tight_on_a_certified_net."""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(net)
    tol = 1e-3
    kw = dict(norms=[norm], steps=40, eps_init=0.05, random_target=False, seed=0, num_classes=3, rel_tol=tol)
    idx = list(range(len(y)))
    # as evaluate runs them: CROWN-IBP warm-started by IBP; CROWN on its own (cold)
    recs = certify_batch(bm, x, y, idx, methods=["ibp", "crown-ibp"], **kw) + \
        certify_batch(bm, x, y, idx, methods=["crown"], **kw)
    r = {m: torch.tensor([d["radius"] for d in recs if d["method"] == m], dtype=DT) for m in ALL}
    cold = {m: certified_radius(bm, x, y, norm, m, steps=40, eps_init=0.05, rel_tol=tol)
            for m in ("ibp", "crown-ibp")}
    cold["crown"] = r["crown"]
    adv = min_adversarial_eps(net, x, y, norm, eps_max=1.0 if norm == "inf" else 8.0, bisection_steps=14,
                              steps=60)
    assert torch.isfinite(adv).all() and (adv > 0).all()
    assert (r["crown"] > 0).all()
    for m in ALL:
        assert (r[m] <= adv).all() and (cold[m] <= adv).all(), (m, r[m] / adv)
    # CROWN is close enough to the attack for this to bite (a 2x radius fails l_inf on every example)
    assert (r["crown"] >= (0.55 if norm == "inf" else 0.3) * adv).all(), r["crown"] / adv
    assert (cold["crown"] * (1 + tol) >= cold["crown-ibp"]).all()
    assert (cold["crown-ibp"] * (1 + tol) >= cold["ibp"]).all()
    assert (cold["crown"] > cold["ibp"]).any()
    # the warm start keeps the cheaper certificate (by construction) and loses nothing to the cold search
    assert (r["crown-ibp"] >= r["ibp"]).all() and (r["crown-ibp"] * (1 + tol) >= cold["crown-ibp"]).all()


#: per norm and method: the smallest radius / attack eps the nearly-tight net must keep (measured
#: minima over its 8 examples: l_inf IBP 0.91, CROWN-IBP 0.72, CROWN 0.92; l_2 0.40, 0.59, 0.59)
_TIGHT = {"inf": {"ibp": 0.8, "crown-ibp": 0.6, "crown": 0.8}, "2": {"ibp": 0.3, "crown-ibp": 0.5, "crown": 0.5}}
#: the least share of the bound's slack (clean margin - bound) that PGD must take at the radius
#: (measured minima: l_inf IBP 0.87, CROWN-IBP 0.71, CROWN 0.87; l_2 0.29, 0.46, 0.46)
_SHARE = {"inf": {"ibp": 0.6, "crown-ibp": 0.6, "crown": 0.6}, "2": {"ibp": 0.25, "crown-ibp": 0.4, "crown": 0.4}}


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_radii_sound_and_nearly_tight_on_a_certified_net(norm):
    """Each method's radius searched on its own (no warm start: a cheaper radius as the lower end
    would hide a broken search) on the certifiably trained net, where the bounds are nearly tight,
    so the soundness checks have teeth: every radius is certified by its own bound, below the
    smallest eps a strong PGD breaks and -- l_inf -- exactly sound (the MILP minimum margin over
    the ball of the largest radius is positive); every radius is at least _TIGHT x the attack's
    eps, so the same radius inflated 2x lies above the attack on some example (on every one but
    l_2 IBP's). At its radius each bound has given up its whole clean margin, and PGD there takes
    a large share of it: clean - attained >= _SHARE x (clean - bound). Ordering, each at
    the search's resolution: CROWN (IBP-intersected; its intermediate bounds are CROWN-IBP's on
    one hidden layer) is never below IBP or CROWN-IBP."""
    net, x, y = _certified_net()
    bm = BoundedModel(net)
    C = _spec(y, 3)
    adv = _adv_eps(net, x, C, norm, hi=0.5 if norm == "inf" else 4.0)
    assert torch.isfinite(adv).all()
    with torch.no_grad():
        clean = (net(x)[:, None] * C).sum(2).min(1).values
    tol = 1e-3
    r = {m: certified_radius(bm, x, y, norm, m, steps=40, rel_tol=tol) for m in ALL}
    for m in ALL:
        assert (r[m] <= adv).all(), (m, r[m] / adv)
        b = _margin(bm, x, y, r[m], norm, m)
        attained = _attained(net, x, C, r[m], norm).min(1).values
        assert (attained >= b).all(), (m, attained, b)
        assert (r[m] > 0).all() and (b > 0).all(), m
        assert (r[m] >= _TIGHT[norm][m] * adv).all() and (2 * r[m] > adv).any(), (m, r[m] / adv)
        share = (clean - attained) / (clean - b)
        assert (share >= _SHARE[norm][m]).all(), (m, share)
    # the affordable full-CROWN search (crown_passes, test_bounds_fast), cold: as sound, near the
    # exact search's radius (measured 0.88-1.0 of it l_inf, 0.61-0.97 l_2), so a 2x one fails too
    fast = certified_radius(bm, x, y, norm, "crown", steps=30, rel_tol=tol, crown_passes=3)
    assert (fast <= adv).all(), fast / adv
    assert (fast <= r["crown"] * (1 + 2 * tol)).all() and (fast >= 0.5 * r["crown"]).all(), fast / r["crown"]
    assert (2 * fast > adv).any()
    if norm == "inf":  # the exact reference: no input within the largest radius is misclassified
        exact = _exact_min(net, x, C, torch.stack(list(r.values())).max(0).values).min(1).values
        assert (exact > 0).all(), exact
    assert (r["crown"] * (1 + tol) >= torch.maximum(r["ibp"], r["crown-ibp"])).all()
