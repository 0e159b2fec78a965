"""certify_batch across norms: a radius certified in one norm certifies the ball of the other
norm that it contains (l_2 ball of radius r inside the l_inf ball of radius r; l_inf ball of
radius r / sqrt(d) inside the l_2 ball of radius r). Reference: the smallest eps a strong PGD
breaks in each norm (a radius never exceeds it), and the search without the other norm."""
from __future__ import annotations

import math

import torch

from dsrna_dist.bounds import BoundedModel
from dsrna_dist.bounds.evaluation import certify_batch, min_adversarial_eps
from test_bounds_fast import _trained_cnn

torch.set_num_threads(1)
METHODS = ["ibp", "crown-ibp", "crown"]


def _radii(recs, norm, method, key="radius"):
    return torch.tensor([r[key] for r in recs if r["norm"] == norm and r["method"] == method], dtype=torch.float64)


def test_radius_of_one_norm_bounds_the_other_and_stays_below_pgd():
    net, x, y = _trained_cnn(0)
    x, y = x[:3], y[:3]
    bm = BoundedModel(net)
    kw = dict(methods=METHODS, steps=30, eps_init=0.05, random_target=True, seed=0, num_classes=3, rel_tol=1e-2)
    both = certify_batch(bm, x, y, list(range(3)), norms=["inf", "2"], **kw)
    alone = certify_batch(bm, x, y, list(range(3)), norms=["2"], **kw)
    rev = certify_batch(bm, x, y, list(range(3)), norms=["2", "inf"], **kw)
    inf_alone = certify_batch(bm, x, y, list(range(3)), norms=["inf"], **kw)
    adv2 = min_adversarial_eps(net, x, y, "2", eps_max=8.0, bisection_steps=14, steps=60)
    adv_inf = min_adversarial_eps(net, x, y, "inf", eps_max=1.0, bisection_steps=14, steps=60)
    d = x[0].numel()
    for m in METHODS:
        for key in ("radius", "radius_target"):
            r_inf, r2 = _radii(both, "inf", m, key), _radii(both, "2", m, key)
            # the warm start moves the bisection path: the search alone may end within rel_tol above
            assert (r2 >= r_inf).all() and (r2 >= _radii(alone, "2", m, key) * (1 - 2e-2)).all(), (m, key)
            assert (_radii(rev, "inf", m, key) >= _radii(rev, "2", m, key) / math.sqrt(d) * (1 - 1e-12)).all()
            assert (_radii(rev, "inf", m, key) >= _radii(inf_alone, "inf", m, key) * (1 - 2e-2)).all()
        assert (_radii(both, "2", m) <= adv2).all() and (_radii(rev, "inf", m) <= adv_inf).all(), m
