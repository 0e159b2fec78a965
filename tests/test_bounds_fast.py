"""Affordable full CROWN (issue 16 item 1): staged intermediate bounds (cut passes first, the
pass to the input only for neurons still loose), cut passes alone (``crown_depth``), max-pool
inputs left at their IBP boxes, and the radius search with at most ``crown_passes`` full-CROWN
passes per example that reuses a failed pass's bounds as functions of eps below it.

References: sampled points and PGD (a bound never crosses a value the network attains), the
smallest eps a strong PGD breaks (a radius never exceeds it), and the exact single-stage full
CROWN (the staged bounds equal it; the fast radius is at most its radius and close to it)."""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from dsrna_dist.bounds.evaluation import min_adversarial_eps
from dsrna_dist.bounds import BoundedModel, BoundError, certified_radius
from test_bounds import assert_sound, pgd_extremes
from test_bounds_tight import _darts, _margin
from test_bounds_tight import _trained_cnn as _fit_cnn

torch.set_num_threads(1)
DT = torch.float64
_NETS: dict = {}


def _trained_cnn(seed: int = 0):
    """The trained small CNN of test_bounds_tight, fitted once per session."""
    if seed not in _NETS:
        _NETS[seed] = _fit_cnn(seed)
    return _NETS[seed]


def _pgd_margin(net, x, y, eps, norm, seed=0):
    """[B] smallest margin min_j f_y - f_j that PGD (and the clean point) attains in the set."""
    def f(z):
        yy = y.repeat_interleave(z.shape[0] // x.shape[0])
        out = net(z)
        m = out.gather(1, yy[:, None]) - out
        return m.scatter(1, yy[:, None], math.inf).min(1, keepdim=True).values
    lo, _ = pgd_extremes(f, x, eps, norm, steps=30, restarts=2, gen=torch.Generator().manual_seed(seed))
    return lo[:, 0]


@pytest.mark.parametrize("kind", ["cnn", pytest.param("darts", marks=pytest.mark.slow)])
def test_staged_intermediate_bounds_equal_single_stage_crown(kind):
    """Cut passes only decide which neurons the full pass recomputes: every neuron that stays
    loose is recomputed to the input, so the bounds equal single-stage CROWN (or are tighter
    by the intersection) -- and they are sound."""
    if kind == "cnn":
        net, x, _ = _trained_cnn(0)
        eps = 0.012
    else:
        net = _darts(layers=3, genotype="DARTS_V2")
        x = torch.rand(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
        eps = 0.003
    exact = BoundedModel(net)
    staged = BoundedModel(net, crown_stages=(1, 2))
    assert_sound(net, x, eps, "inf", methods=("crown",), bm=staged, n_samples=32, pgd_steps=15, restarts=1)
    lo_e, up_e = exact.bounds(x, eps, "inf", "crown")
    lo_s, up_s = staged.bounds(x, eps, "inf", "crown")
    assert (lo_s >= lo_e - 1e-9).all() and (up_s <= up_e + 1e-9).all()
    torch.testing.assert_close(lo_s, lo_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up_s, up_e, rtol=1e-6, atol=1e-6)


def test_cut_passes_and_ibp_pool_inputs_are_sound_and_looser():
    """crown_depth=1 (every intermediate pass stops one relaxed layer back, at that layer's
    box) and crown_pool_inputs=False (max-pool inputs keep IBP boxes): sound, never tighter
    than full CROWN, and the cut is strictly looser somewhere (it does lose something)."""
    net = _darts(layers=2, genotype="DARTS_V2")  # cell 1 is a reduction cell with max pools
    x = torch.rand(2, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    eps = 0.003
    with torch.no_grad():
        lo_e, up_e = BoundedModel(net).bounds(x, eps, "inf", "crown")
    widths = {}
    for kw in (dict(crown_depth=1), dict(crown_pool_inputs=False)):
        bm = BoundedModel(net, **kw)
        assert_sound(net, x, eps, "inf", methods=("crown",), bm=bm, n_samples=32, pgd_steps=15, restarts=1)
        with torch.no_grad():
            lo, up = bm.bounds(x, eps, "inf", "crown")
        assert (lo <= lo_e + 1e-9).all() and (up >= up_e - 1e-9).all(), kw
        widths[str(kw)] = float((up - lo).sum() - (up_e - lo_e).sum())
    assert widths[str(dict(crown_depth=1))] > 0, widths
    with pytest.raises(BoundError, match="crown_depth"):
        BoundedModel(net, crown_depth=-1)


@pytest.mark.parametrize("fwd", [False, True])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_eps_linear_reuse_sound_and_exact_at_its_eps(norm, fwd):
    """The intermediate bounds of a full pass at eps_p, kept as centre -/+ eps * dual norm,
    re-used at a smaller eps with one backward pass: equal to full CROWN at eps_p, sound below
    it (PGD), tighter than reusing eps_p's boxes alone (without the forward pre-pass: with it,
    eps_p's boxes are already so tight on this net that the margin does not move), and never
    above fresh full CROWN."""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(net, crown_forward=fwd)
    eps_p = 0.012 if norm == "inf" else 0.04
    keep, keep_lin = {}, {}
    full = bm.margin_lower_bound(x, y, eps_p, norm, "crown", keep=keep, keep_lin=keep_lin)
    assert keep_lin, "no linear bounds were kept"
    same = bm.margin_lower_bound(x, y, eps_p, norm, "crown", prior=keep, prior_lin=keep_lin, frozen=True)
    torch.testing.assert_close(same, full, rtol=1e-7, atol=1e-7)
    eps = eps_p * 0.8
    reuse = _margin_of(bm.margin_lower_bound(x, y, eps, norm, "crown", prior=keep, prior_lin=keep_lin, frozen=True), y)
    boxes = _margin_of(bm.margin_lower_bound(x, y, eps, norm, "crown", prior=keep, frozen=True), y)
    fresh = _margin(bm, x, y, eps, norm, "crown")
    attained = _pgd_margin(net, x, y, eps, norm)
    assert (reuse <= attained + 1e-9).all()
    assert (reuse >= boxes - 1e-9).all() and (fwd or (reuse > boxes + 1e-6).any())
    assert (reuse <= fresh + 1e-9).all()


def _margin_of(m, y):
    return m.scatter(1, y[:, None], math.inf).min(1).values


@pytest.mark.parametrize("norm", ["inf", pytest.param("2", marks=pytest.mark.slow)])
def test_fast_crown_radius_below_pgd_and_close_to_exact(norm):
    """The independent reference for the fast path: on every example of a trained net its
    radius is at most the smallest eps a strong PGD breaks, a fresh full-CROWN pass certifies
    it, it is >= the CROWN-IBP radius it starts from and at most the exact CROWN radius.
    (fast >= CROWN-IBP >= IBP holds by construction for the warm-started searches, whatever the
    bounds; the CROWN-IBP >= IBP order is checked on radii searched without the warm start.)"""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(net)
    kw = dict(steps=30, rel_tol=1e-3)
    ibp = certified_radius(bm, x, y, norm, "ibp", **kw)
    cibp_cold = certified_radius(bm, x, y, norm, "crown-ibp", **kw)
    assert (cibp_cold * (1 + 1e-3) >= ibp).all() and (cibp_cold > ibp).any()
    cibp = certified_radius(bm, x, y, norm, "crown-ibp", lower=ibp, **kw)
    fast = certified_radius(bm, x, y, norm, "crown", lower=cibp, crown_passes=3, **kw)
    exact = certified_radius(bm, x, y, norm, "crown", lower=cibp, **kw)
    adv = min_adversarial_eps(net, x, y, norm, eps_max=1.0 if norm == "inf" else 8.0, bisection_steps=14, steps=60,
                              restarts=3)
    assert torch.isfinite(adv).all()
    assert (fast <= adv).all(), (fast, adv)
    assert (_margin(bm, x, y, fast, norm, "crown") > 0).all()
    assert (fast >= cibp).all() and (cibp >= ibp).all()   # the warm starts (by construction)
    assert (cibp * (1 + 1e-3) >= cibp_cold).all()           # ... and they lose nothing to a cold search
    assert (fast > cibp * 1.01).all(), "the full-CROWN passes gained nothing over CROWN-IBP"
    assert (fast <= exact * (1 + 2e-3)).all()
    assert (fast >= exact * 0.95).all(), (fast / exact)


def test_float32_bounds_match_a_float64_spot_check():
    """The eval path runs float32 (the checkpoint's dtype): its CROWN margins, staged and via
    the eps-linear reuse, agree with the same computation in float64 to float32 precision, so
    rounding cannot turn an uncertified example into a certified one beyond that slack."""
    net, x, y = _trained_cnn(0)
    net32 = copy.deepcopy(net).float()
    eps = 0.012
    with torch.no_grad():
        m64 = _margin(BoundedModel(net, crown_stages=(1,)), x, y, eps, "inf", "crown")
        m32 = _margin(BoundedModel(net32, crown_stages=(1,)), x.float(), y, eps, "inf", "crown").double()
    scale = m64.abs().clamp(min=1.0)
    assert ((m32 - m64).abs() <= 1e-4 * scale).all(), (m32 - m64)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_bounds_under_bf16_autocast_are_the_fp32_bounds(method):
    """A bf16 caller (the arch step or certified training with mixed_precision=bf16) gets the
    fp32 bounds: bf16 rounding is no part of the relaxation. Before the guard, CPU autocast
    broke the IBP tensordot with mixed dtypes; the C a caller builds in bf16 is taken too."""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(copy.deepcopy(net).float())
    x = x.float()
    C = torch.eye(3)[y][:, None, :] - torch.eye(3)[(y + 1) % 3][:, None, :]
    want = bm.bounds(x, 0.01, "inf", method, C)
    want_m = bm.margin_lower_bound(x, y, 0.01, "inf", method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bm.bounds(x, 0.01, "inf", method, C.bfloat16())
        got_m = bm.margin_lower_bound(x, y, 0.01, "inf", method)
    for g, w in ((got[0], want[0]), (got[1], want[1]), (got_m, want_m)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_fast_crown_radius_without_warm_start_from_a_far_eps():
    """No bracket and a first pass far above the radius (eps_init 0.2, radii ~0.01): the
    one-backward probes below the failed pass, then a pass lower down, still find a radius
    that a fresh full-CROWN pass certifies and that PGD does not break."""
    net, x, y = _trained_cnn(0)
    x, y = x[:4], y[:4]
    bm = BoundedModel(net)
    r = certified_radius(bm, x, y, "inf", "crown", steps=20, rel_tol=1e-2, crown_passes=2, eps_init=0.2)
    assert (r > 0).all()
    assert (_margin(bm, x, y, r, "inf", "crown") > 0).all()
    adv = min_adversarial_eps(net, x, y, "inf", eps_max=1.0, bisection_steps=12, steps=40, restarts=2)
    assert (r <= adv).all()


def test_fast_crown_passes_placed_by_the_margins_reach_near_the_exact_radius():
    """Four full passes from an eps_init 5x below the radii, no warm start: while the margin has
    fallen < 25% a pass steps 2x at most (a flat stretch cannot tell a cliff from a near-linear
    margin), then the chord through the last two certified passes places it, so the radius is
    most of the exact CROWN radius (a fixed 1.5x step would stop at 3.4 x eps_init, ~68% of the
    smallest and 27% of the largest), is certified by a fresh full pass and is never above the
    exact search's radius."""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(net)
    exact = certified_radius(bm, x, y, "inf", "crown", steps=30, rel_tol=1e-3)
    init = float(exact.min()) / 5
    fast = certified_radius(bm, x, y, "inf", "crown", steps=20, rel_tol=1e-3, crown_passes=4, eps_init=init)
    assert (fast <= exact * (1 + 2e-3)).all()
    assert (_margin(bm, x, y, fast, "inf", "crown") > 0).all()
    assert (fast >= 0.5 * exact).all(), (fast / exact)
    # a cheaper bound's tiny radius as the warm start (CROWN-IBP on a naturally trained DARTS net)
    # must not make the passes crawl up from it: the first pass still goes to eps_init
    warm = certified_radius(bm, x, y, "inf", "crown", steps=20, rel_tol=1e-3, crown_passes=4, eps_init=init,
                            lower=exact * 1e-3)
    assert (warm >= 0.5 * exact).all(), (warm / exact)
    assert (warm <= exact * (1 + 2e-3)).all()


@pytest.mark.parametrize("passes", [0, 2])
def test_radius_bracket_reports_where_the_bound_failed(passes):
    """``bracket=True``: the bound certifies at the radius and a fresh evaluation of the same
    bound fails at the reported failure eps, which lies above the radius (for the fast path:
    the smallest failed full pass; its probes are looser and do not count)."""
    net, x, y = _trained_cnn(0)
    x, y = x[:4], y[:4]
    bm = BoundedModel(net)
    r, failed = certified_radius(bm, x, y, "inf", "crown", steps=12, rel_tol=1e-2, crown_passes=passes,
                                 eps_init=0.2, bracket=True)
    assert torch.isfinite(failed).all() and (failed > r).all() and (r > 0).all()
    assert (_margin(bm, x, y, r, "inf", "crown") > 0).all()
    assert (_margin(bm, x, y, failed, "inf", "crown") <= 0).all()
    assert torch.equal(r, certified_radius(bm, x, y, "inf", "crown", steps=12, rel_tol=1e-2, crown_passes=passes,
                                           eps_init=0.2))


def _place(m0: float, pts, fail=None) -> float:
    """The next pass's eps from certified full passes ``pts`` [(eps, margin), ...] and a failure."""
    from dsrna_dist.bounds.certify import _next_pass
    t = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    (pe, pm), (ce, cm) = ([(0.0, m0)] + list(pts))[-2:]
    fe, fm = fail if fail is not None else (math.inf, 0.0)
    lo, hi = t(math.log(ce)), t(math.log(fe))
    return float(_next_pass(lo, hi, t(m0), t(ce), t(cm), t(pe), t(pm), t(fe), t(fm), math.log1p(1e-3)).exp())


def test_pass_placement_on_measured_margin_curves():
    """The rule on full-CROWN margin curves measured on the grid's natural nets (first test
    image; BENCHMARKS.md "Radius search placement"). PC-DARTS seed 0 is a cliff (6.91 clean,
    6.49 at 1e-4, 3.63 at 2e-4, -20.7 at 3e-4): after 1e-4 the chord from the clean point aims
    ~10x up, the pass must stay where the curve is known to certify. DARTS seed 0 (5.33, 3.92 at
    1e-4, 2.14 at 2e-4, 0.71 at 2.66e-4, 0.19 at 2.88e-4) falls steadily: its chord is followed
    to near the radius. After a failure the pass lands inside the measured certified range."""
    pc = _place(6.91, [(1e-4, 6.49)])
    assert 1.5e-4 < pc <= 2e-4 * 1.001, pc
    darts = _place(5.33, [(1e-4, 3.92)])
    assert 2.2e-4 < darts <= 2.88e-4, darts
    darts2 = _place(5.33, [(1e-4, 3.92), (2e-4, 2.14)])
    assert 2.5e-4 < darts2 <= 2.88e-4, darts2
    pc_fail = _place(6.91, [(1e-4, 6.49)], fail=(3e-4, -20.7))
    assert 1.2e-4 < pc_fail <= 2e-4, pc_fail


def test_pass_placement_after_a_flat_stretch():
    """The natural DSRNA-Jacobian seed-0 net, first test image (measured: 5.852 clean, 5.801 at
    1e-4, 5.731 at 2e-4, 5.475 at 4e-4, -2141 at 1.48e-3): after two certified passes the margin
    has fallen 2%, and the chord through them aims far past the cliff (the rule that trusted any
    two-pass chord sent the third pass to the e^2 cap, 1.48e-3, which failed). The third pass
    must stay where the curve certifies and still move up."""
    flat = _place(5.852, [(1e-4, 5.801), (2e-4, 5.731)])
    assert 2e-4 < flat <= 4e-4 * 1.001, flat


def test_extra_passes_go_to_unbracketed_radii_with_margin_left_only():
    """Two passes from an eps_init 40x below the radii leave them unbracketed with most of the
    margin left (a flat stretch steps 2x a pass). Warm starts near the radius give the other two
    kinds: a first pass above it (bracketed) and unbracketed with the margin spent (a radius close
    to the exact one). ``crown_extra_passes`` moves exactly the first kind on: their radii grow
    toward the exact CROWN radius, stay certified by a fresh full pass and never exceed the exact
    search's radius, while the others keep their radii bit for bit; at ``crown_extra_margin`` 1
    no example qualifies and nothing changes."""
    net, x, y = _trained_cnn(0)
    bm = BoundedModel(net)
    exact = certified_radius(bm, x, y, "inf", "crown", steps=30, rel_tol=1e-3)
    low = torch.zeros_like(exact)
    low[:2], low[2:4] = 0.9 * exact[:2], 0.6 * exact[2:4]
    kw = dict(steps=20, rel_tol=1e-3, crown_passes=2, eps_init=float(exact.min()) / 40, bracket=True, lower=low)
    info: dict = {}
    base, fail = certified_radius(bm, x, y, "inf", "crown", info=info, **kw)
    left = info["margin_left"]
    assert (left <= 1).all() and (left > 0).all(), left
    flat = torch.isinf(fail) & (left > 0.25)
    spent = torch.isinf(fail) & (left <= 0.25)
    assert torch.isfinite(fail[:2]).all() and spent[2:4].all() and flat[4:].all(), (fail, left)
    assert (base[spent] >= 0.9 * exact[spent]).all()         # margin spent: the radius is close
    assert (base[flat] < 0.5 * exact[flat]).all()            # margin left: it may be far below
    info2: dict = {}
    more = certified_radius(bm, x, y, "inf", "crown", crown_extra_passes=4, info=info2, **kw)[0]
    assert torch.equal(more[~flat], base[~flat])
    assert (more[flat] > 1.5 * base[flat]).all(), (more / base)
    assert (more <= exact * (1 + 2e-3)).all()
    assert (_margin(bm, x, y, more, "inf", "crown") > 0).all()
    assert (info2["margin_left"][flat] < left[flat]).all()
    none = certified_radius(bm, x, y, "inf", "crown", crown_extra_passes=4, crown_extra_margin=1.0, **kw)[0]
    assert torch.equal(none, base)
    with pytest.raises(ValueError, match="crown_extra"):
        certified_radius(bm, x, y, "inf", "crown", crown_extra_passes=-1, **kw)


def test_certify_records_state_the_margin_left_and_the_summary_its_median():
    """certify_batch with crown_passes (the evaluate stage's path): each CROWN record carries the
    margin left of its search (targeted too), equal to the search's own ``info``; the summary
    gives the median over the unbracketed radii; the cheaper methods carry None."""
    from dsrna_dist.bounds.evaluation import certify_batch
    from dsrna_dist.evaluate import summarize_certified

    net, x, y = _trained_cnn(0)
    x, y = x[:4], y[:4]
    recs = certify_batch(net, x, y, list(range(4)), methods=["ibp", "crown"], norms=["inf"], steps=12,
                         eps_init=1e-3, random_target=True, seed=0, num_classes=3, rel_tol=1e-2,
                         crown_passes=1)
    crown = [r for r in recs if r["method"] == "crown"]
    assert all(r["margin_left"] is None and r["margin_left_target"] is None for r in recs if r["method"] == "ibp")
    assert all(0 < r["margin_left"] <= 1 and 0 < r["margin_left_target"] <= 1 for r in crown), crown
    ibp_r = torch.tensor([r["radius"] for r in recs if r["method"] == "ibp"], dtype=x.dtype)
    info: dict = {}
    certified_radius(BoundedModel(net), x, y, "inf", "crown", steps=12, eps_init=1e-3, rel_tol=1e-2,
                     crown_passes=1, lower=ibp_r, info=info)
    assert [r["margin_left"] for r in crown] == pytest.approx(info["margin_left"].tolist(), abs=1e-4)
    unb = [r["margin_left"] for r in crown if not r["failed_at"]]
    s = summarize_certified(recs)["crown"]["inf"]
    assert unb and s["median_margin_left_unbracketed"] == pytest.approx(statistics.median(unb))
