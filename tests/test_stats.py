"""The comparison tables' t-tests against scipy.stats (an independent implementation)."""
from __future__ import annotations

import math
import random

import pytest

from dsrna_dist import stats

scipy_stats = pytest.importorskip("scipy.stats")


def samples(seed: int, n: int, mu: float, sd: float):
    r = random.Random(seed)
    return [r.gauss(mu, sd) for _ in range(n)]


@pytest.mark.parametrize("seed,na,nb,shift", [(0, 3, 3, 0.0), (1, 3, 3, 2.0), (2, 2, 5, 1.0), (3, 10, 4, 0.5),
                                              (4, 3, 3, 8.0)])
def test_welch_matches_scipy(seed, na, nb, shift):
    a, b = samples(seed, na, shift, 1.0), samples(seed + 100, nb, 0.0, 2.5)
    got = stats.welch(a, b)
    want = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert got.t == pytest.approx(float(want.statistic), rel=1e-10)
    assert got.p == pytest.approx(float(want.pvalue), rel=1e-8, abs=1e-14)
    assert got.diff == pytest.approx(stats.mean(a) - stats.mean(b))


@pytest.mark.parametrize("seed,n,shift", [(0, 3, 0.3), (1, 3, 3.0), (2, 8, 0.1)])
def test_paired_matches_scipy(seed, n, shift):
    a = samples(seed, n, 0.0, 1.0)
    b = [x - shift + e for x, e in zip(a, samples(seed + 7, n, 0.0, 0.5))]
    got = stats.paired(a, b)
    want = scipy_stats.ttest_rel(a, b)
    assert got.t == pytest.approx(float(want.statistic), rel=1e-10)
    assert got.p == pytest.approx(float(want.pvalue), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("t,df", [(0.0, 2.0), (0.7, 2.0), (4.3, 2.0), (-2.1, 5.5), (30.0, 3.0), (1.0, 1e4)])
def test_t_tail_matches_scipy(t, df):
    assert stats.t_two_sided_p(t, df) == pytest.approx(2 * float(scipy_stats.t.sf(abs(t), df)), rel=1e-9, abs=1e-15)


def test_degenerate_cases_are_stated_not_crashes():
    assert stats.welch([1.0], [1.0, 2.0]) is None
    assert stats.paired([1.0], [2.0]) is None
    eq = stats.welch([1.0, 1.0], [1.0, 1.0])
    assert eq.p == 1.0
    ne = stats.welch([1.0, 1.0], [2.0, 2.0])
    assert ne.p == 0.0 and math.isinf(ne.t)
    assert stats.std([3.0]) == 0.0
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (0, 5), (5, 0), (2, 7), (3, 3), (1, 12), (10, 4)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    ref = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)
