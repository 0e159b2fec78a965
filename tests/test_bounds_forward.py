"""Forward-mode linear bounds (issue 16 item 1): the pre-pass that settles intermediate neurons
before full CROWN's backward passes, and the ``crown-forward`` method.

References: sampled points (l_inf corners, l_2 sphere points) and PGD extremes, for the output
and for every relaxed node's box (a bound never crosses a value the network attains); IBP (the
boxes are intersected with it, so never looser); full CROWN without the pre-pass (the margin
bound with it is never lower, up to 1e-5); a float64 copy of a float32 net; the smallest eps a
strong PGD breaks (a CROWN radius with the pre-pass never exceeds it)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dsrna_dist.bounds import BoundedModel, certified_radius
from dsrna_dist.bounds.evaluation import min_adversarial_eps
from test_bounds import assert_sound, ops_net, sample_points
from test_bounds_fast import _pgd_margin, _trained_cnn
from test_bounds_tight import _cnn, _darts

torch.set_num_threads(1)
DT = torch.float64
NORMS = ("inf", "2")


def _node_values(bm: BoundedModel, pts: torch.Tensor) -> dict:
    """The clean value of every node at ``pts`` (IBP at eps 0: lower = upper = the value)."""
    with torch.no_grad():
        run = bm._propagate(pts, pts.new_zeros(pts.shape[0]), "inf", "ibp", -math.inf, math.inf)
    return {n: b.lower for n, b in run.bnd.items()}


def _nets():
    g = torch.Generator().manual_seed(3)
    return [("every_op", ops_net(0), torch.rand(2, 1, 8, 8, dtype=DT, generator=g), 0.02),
            ("darts_v2", _darts(layers=3, genotype="DARTS_V2"), torch.rand(2, 1, 8, 8, dtype=DT, generator=g), 0.01),
            ("pc_darts", _darts(layers=3), torch.rand(2, 1, 8, 8, dtype=DT, generator=g), 0.01),
            ("cnn_pool", _cnn(1), torch.rand(2, 1, 8, 8, dtype=DT, generator=g), 0.02)]


@pytest.mark.parametrize("norm", NORMS)
def test_forward_bounds_sound_and_boxes_inside_ibp(norm):
    """On nets with every op of the derived DARTS cells (sep/dil conv, BN eval, ReLU, max/avg
    pool, skip, factorized reduce, zero, concat, add, weighted sums, linear head): the output
    bounds of crown-forward and crown contain every sampled and PGD value; every relaxed
    node's box contains the node's value at 48 sampled points and lies inside its IBP box."""
    for name, net, x, eps in _nets():
        e = eps if norm == "inf" else eps * 4
        bm = BoundedModel(net)
        assert_sound(net, x, e, norm, methods=("crown-forward", "crown"), bm=bm, n_samples=32, pgd_steps=10,
                     restarts=1)
        keep_f, keep_i = {}, {}
        with torch.no_grad():
            bm.bounds(x, e, norm, "crown-forward", keep=keep_f)
            bm.bounds(x, e, norm, "ibp", keep=keep_i)
        pts = sample_points(x, e, norm, 48, torch.Generator().manual_seed(0))
        vals = _node_values(bm, pts)
        tighter = 0
        for n, box in keep_f.items():
            v = vals[n].view((x.shape[0], 48) + tuple(box.lower.shape[1:]))
            assert (v >= box.lower.unsqueeze(1) - 1e-9).all(), (name, norm, n.name)
            assert (v <= box.upper.unsqueeze(1) + 1e-9).all(), (name, norm, n.name)
            assert (box.lower >= keep_i[n].lower - 1e-12).all() and (box.upper <= keep_i[n].upper + 1e-12).all(), \
                (name, n.name, (keep_i[n].lower - box.lower).max().item(), (box.upper - keep_i[n].upper).max().item())
            tighter += int(((box.upper - box.lower) < (keep_i[n].upper - keep_i[n].lower) - 1e-9).sum())
        assert tighter > 0, name  # the pre-pass does something on every net


@pytest.mark.parametrize("norm", NORMS)
def test_prepass_crown_never_looser_than_plain_crown_and_below_pgd(norm):
    """Full CROWN with the pre-pass (boxes IBP ∩ forward, backward passes only on rows still
    loose): its margin lower bound is >= the plain full CROWN's - 1e-5 on every example and
    class, and <= the margin PGD reaches; it runs fewer backward rows."""
    cases = [("trained_cnn",) + tuple(_trained_cnn(0)[:2]) + (0.02,),
             ("darts_v2", _darts(layers=3, genotype="DARTS_V2"),
              torch.rand(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(5)), 0.004)]
    for name, net, x, eps in cases:
        e = eps if norm == "inf" else eps * 4
        with torch.no_grad():
            y = net(x).argmax(1)
        new, old = BoundedModel(net), BoundedModel(net, crown_forward=False)
        with torch.no_grad():
            m_new = new.margin_lower_bound(x, y, e, norm, "crown")
            rows_new = sum(new.last_run_rows.values())
            m_old = old.margin_lower_bound(x, y, e, norm, "crown")
            rows_old = sum(old.last_run_rows.values())
            m_fwd = new.margin_lower_bound(x, y, e, norm, "crown-forward")
        assert (m_new >= m_old - 1e-5).all(), (name, (m_new - m_old).min())
        assert (m_new >= m_fwd - 1e-9).all(), name  # the spec bound is intersected with the forward one
        assert rows_new < rows_old, (name, rows_new, rows_old)
        worst = m_new.scatter(1, y[:, None], math.inf).min(1).values
        assert (worst <= _pgd_margin(net, x, y, e, norm) + 1e-7).all(), name


def test_op_without_a_forward_rule_falls_back_to_its_box():
    """An op whose bound class has no ``lin`` keeps its box as constant bounds (zero weights):
    still sound, and no looser than IBP."""
    net, x, eps = _darts(layers=3, genotype="DARTS_V2"), torch.rand(2, 1, 8, 8, dtype=DT), 0.01
    bm = BoundedModel(net)
    convs = [op for n, op in bm.ops.items() if type(op).__name__ == "BoundConv2d"]
    convs[len(convs) // 2].lin = lambda *a, **k: None  # as if the class had no rule
    out = assert_sound(net, x, eps, "inf", methods=("crown-forward", "crown", "ibp"), bm=bm, n_samples=32,
                       pgd_steps=10, restarts=1)
    run = bm._propagate(x, torch.full((2,), eps, dtype=DT), "inf", "crown-forward", 0.0, 1.0)
    assert run.fwd_fallback == [convs[len(convs) // 2].name]
    assert (out["crown-forward"][0] >= out["ibp"][0] - 1e-12).all()


def test_float32_forward_bounds_match_a_float64_spot_check():
    """At small eps the forward weights are tiny next to the biases (bounds at the clean input):
    the float32 bounds must agree with float64 ones and stay below PGD in float64."""
    net64 = _darts(layers=3, genotype="DARTS_V2")
    net32 = copy.deepcopy(net64).float()
    x = torch.rand(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net64(x).argmax(1)
        for eps in (1e-4, 3e-3):
            m64 = BoundedModel(net64).margin_lower_bound(x, y, eps, "inf", "crown")
            m32 = BoundedModel(net32).margin_lower_bound(x.float(), y, eps, "inf", "crown").double()
            assert torch.allclose(m32, m64, rtol=1e-3, atol=1e-4), (eps, (m32 - m64).abs().max())
            f64 = BoundedModel(net64).margin_lower_bound(x, y, eps, "2", "crown-forward")
            f32 = BoundedModel(net32).margin_lower_bound(x.float(), y, eps, "2", "crown-forward").double()
            assert torch.allclose(f32, f64, rtol=1e-3, atol=1e-4), (eps, (f32 - f64).abs().max())


def test_forward_chunks_over_examples_give_the_same_bounds():
    """A small memory budget runs the forward pass one example at a time: same bounds, same
    kept boxes and linear bounds (the radius search reads them) as one batch."""
    net, x, eps = _darts(layers=3, genotype="DARTS_V2"), torch.rand(3, 1, 8, 8, dtype=DT), 0.004
    with torch.no_grad():
        y = net(x).argmax(1)
    big, small = BoundedModel(net, max_memory_mb=1e4), BoundedModel(net, max_memory_mb=1e-3)
    assert small._forward_examples(x, None) == 1 and big._forward_examples(x, None) >= 3
    kb, ks, lb_, ls = {}, {}, {}, {}
    with torch.no_grad():
        mb = big.margin_lower_bound(x, y, eps, "2", "crown", keep=kb, keep_lin=lb_)
        ms = small.margin_lower_bound(x, y, eps, "2", "crown", keep=ks, keep_lin=ls)
    assert torch.allclose(mb, ms, atol=1e-10)
    name = lambda d: {n.name: v for n, v in d.items()}  # noqa: E731  (two traces: match nodes by name)
    kb, ks, lb_, ls = name(kb), name(ks), name(lb_), name(ls)
    assert kb.keys() == ks.keys() and lb_.keys() == ls.keys() and len(ls) > 0
    for n in kb:
        assert torch.allclose(kb[n].lower, ks[n].lower, atol=1e-10)
        assert torch.allclose(kb[n].upper, ks[n].upper, atol=1e-10)
    for n in lb_:
        for a, b in zip(lb_[n], ls[n]):
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-10)


@pytest.mark.slow  # the default suite checks the pre-pass radius below PGD in test_bounds_tight (CROWN = pre-pass on)
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_prepass_crown_radius_below_pgd_and_no_smaller_than_plain(norm):
    """The radius search with the pre-pass (exact search and crown_passes=2): never above the
    smallest eps a strong PGD breaks; the exact search's radius >= plain CROWN's (same probes,
    never looser bounds) up to the search resolution."""
    net, x, y = _trained_cnn(0)
    x, y = x[:5], y[:5]
    kw = dict(steps=40, rel_tol=1e-3, eps_init=0.05)
    r_new = certified_radius(BoundedModel(net), x, y, norm, "crown", **kw)
    r_old = certified_radius(BoundedModel(net, crown_forward=False), x, y, norm, "crown", **kw)
    r_fast = certified_radius(BoundedModel(net), x, y, norm, "crown", crown_passes=2, **kw)
    adv = min_adversarial_eps(net, x, y, norm, eps_max=1.0 if norm == "inf" else 8.0, bisection_steps=14, steps=60)
    assert (r_new > 0).all() and (r_new <= adv).all() and (r_fast <= adv).all(), (r_new, r_fast, adv)
    assert (r_new >= r_old * (1 - 2e-3)).all(), (r_new, r_old)
    assert (r_fast <= r_new * (1 + 2e-3)).all(), (r_fast, r_new)


@pytest.mark.parametrize("norm", NORMS)
def test_kept_linear_bounds_contain_node_values_below_their_eps(norm):
    """The bounds a full pass keeps for the radius search (forward rows and backward rows, as
    centre -/+ e * dual norm) contain every relaxed node's value at sampled points of the
    set at e = eps_p and e = eps_p / 2 (the kept tensors are fresh: writing the backward rows
    into them must not touch a Lin's bias or the other bound)."""
    net = _darts(layers=3, genotype="DARTS_V2")
    x = torch.rand(2, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = net(x).argmax(1)
    bm = BoundedModel(net)
    eps_p = 0.004 if norm == "inf" else 0.016
    keep_lin: dict = {}
    with torch.no_grad():
        bm.margin_lower_bound(x, y, eps_p, norm, "crown", keep_lin=keep_lin)
    assert set(keep_lin) == set(bm.pre_act)
    for e in (eps_p, eps_p / 2):
        pts = sample_points(x, e, norm, 32, torch.Generator().manual_seed(1))
        vals = _node_values(bm, pts)
        for n, (cl, nl, cu, nu) in keep_lin.items():
            v = vals[n].reshape(2, 32, -1)
            assert (v >= (cl - e * nl).unsqueeze(1) - 1e-9).all(), (n.name, e)
            assert (v <= (cu + e * nu).unsqueeze(1) + 1e-9).all(), (n.name, e)


def test_probed_pool_rows_sound_and_skip_work():
    """``crown_probe_rows``: max-pool input rows are skipped only where the probe rows gained
    less than the tolerance. Sound (PGD, sampling), never tighter than exact full CROWN, and
    with tolerance 0 nothing is skipped (the bounds equal it)."""
    net = _cnn(2, c=6)  # max pool 3x3 stride 2 on a conv's output: many candidates per window
    x = torch.rand(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = net(x).argmax(1)
    exact = BoundedModel(net)
    probed = BoundedModel(net, crown_probe_rows=2, crown_probe_tol=1.0)
    none = BoundedModel(net, crown_probe_rows=2, crown_probe_tol=0.0)
    assert_sound(net, x, 0.03, "inf", methods=("crown",), bm=probed, n_samples=32, pgd_steps=10, restarts=1)
    with torch.no_grad():
        m_exact = exact.margin_lower_bound(x, y, 0.03, "inf", "crown")
        m_probed = probed.margin_lower_bound(x, y, 0.03, "inf", "crown")
        skipped = sum(probed.last_run_skipped.values())
        m_none = none.margin_lower_bound(x, y, 0.03, "inf", "crown")
    assert skipped > 0 and sum(none.last_run_skipped.values()) == 0
    assert torch.allclose(m_none, m_exact, atol=1e-10)
    assert (m_probed <= m_exact + 1e-10).all()
