"""The comparison tables' t-tests against scipy.stats (an independent implementation)."""
from __future__ import annotations

import itertools
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


def test_holm_by_hand_and_none_kept():
    got = stats.holm([0.01, None, 0.04, 0.03, 0.5])
    # m = 4 sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.09, max(0.09, 0.08) = 0.09, max(0.09, 0.5) = 0.5
    assert got[1] is None
    assert got[0] == pytest.approx(0.04) and got[3] == pytest.approx(0.09)
    assert got[2] == pytest.approx(0.09) and got[4] == pytest.approx(0.5)
    assert stats.holm([]) == [] and stats.holm([0.3]) == [0.3] and stats.holm([0.6, 0.7]) == [1.0, 1.0]


@pytest.mark.parametrize("seed", range(20))
def test_holm_adjusted_p_rejects_exactly_what_the_step_down_procedure_rejects(seed):
    """The reference: Holm's procedure as a decision at level alpha (reject the smallest p while
    p_(k) <= alpha / (m - k), stop at the first failure), against adjusted p <= alpha."""
    rng = random.Random(seed)
    m = rng.randint(1, 12)
    ps = [rng.choice([rng.random() ** 3, rng.random(), 0.0, 1.0]) for _ in range(m)]
    adj = stats.holm(ps)
    assert all(a >= p for a, p in zip(adj, ps))
    for alpha in [0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 0.99] + [p for p in ps if p < 1]:  # (adjusted p caps at 1)
        rejected = set()
        for k, (p, i) in enumerate(sorted((p, i) for i, p in enumerate(ps))):
            if p > alpha / (m - k):
                break
            rejected.add(i)
        assert {i for i, a in enumerate(adj) if a <= alpha} == rejected, (ps, alpha)


@pytest.mark.parametrize("alpha,df", [(0.05, 2.0), (0.00625, 2.0), (0.05, 1.3), (0.01, 5.5), (0.05, 40.0)])
def test_t_critical_matches_scipy(alpha, df):
    assert stats.t_two_sided_critical(alpha, df) == pytest.approx(float(scipy_stats.t.ppf(1 - alpha / 2, df)), rel=1e-9)


@pytest.mark.parametrize("diff,sd_a,sd_b,n,alpha", [(19.5, 7.7, 11.1, 3, 0.05), (19.5, 7.7, 11.1, 6, 0.05 / 8),
                                                    (0.6, 0.22, 0.22, 3, 0.05), (1.0, 1.0, 2.0, 8, 0.05),
                                                    (3.0, 1.0, 5.0, 4, 0.01), (0.0, 1.0, 1.0, 2, 0.05)])
def test_welch_power_matches_scipys_welch_test_simulated(diff, sd_a, sd_b, n, alpha):
    """The reference: scipy's own Welch test on independent draws (another generator and seed).
    Both are Monte Carlo at 20000 draws (sd <= 0.0035 each): agree within 0.02. At n = 3 the
    noncentral-t formula would miss by 0.07-0.10 here (0.45 against 0.38 in the first case)."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(12345)
    a, b = rng.normal(diff, sd_a, (20000, n)), rng.normal(0.0, sd_b, (20000, n))
    want = float((scipy_stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < alpha).mean())
    assert stats.welch_power(diff, sd_a, sd_b, n, alpha) == pytest.approx(want, abs=0.02)


@pytest.mark.parametrize("diff,sd_a,sd_b,alpha", [(19.5, 7.7, 11.1, 0.05 / 8), (0.6, 0.22, 0.22, 0.05),
                                                  (-1.2, 0.96, 0.22, 0.05 / 8), (5.0, 1.0, 1.0, 0.05)])
def test_seeds_for_power_is_the_first_n_that_reaches_it(diff, sd_a, sd_b, alpha):
    n = stats.seeds_for_power(diff, sd_a, sd_b, alpha, power=0.8)
    assert n is not None and n >= 2
    assert stats.welch_power(diff, sd_a, sd_b, n, alpha) >= 0.8
    if n > 2:
        assert stats.welch_power(diff, sd_a, sd_b, n - 1, alpha) < 0.8
    assert stats.seeds_for_power(0.1, 1.0, 1.0, 0.05, n_max=30) is None  # z-test bound: 1570 a side
    assert stats.seeds_for_power(0.0, 1.0, 1.0) is None and stats.seeds_for_power(1.0, 0.0, 0.0) == 2


@pytest.mark.parametrize("seed,n,ties", [(0, 5, False), (1, 12, False), (2, 24, True), (3, 8, True)])
def test_spearman_matches_scipy_with_and_without_ties(seed, n, ties):
    r = random.Random(seed)
    x = [float(r.randint(1, 9)) if ties else r.gauss(0, 1) for _ in range(n)]
    # many zeros, as radii that certify nothing, plus a monotone-ish dependence on x
    y = [0.0 if ties and r.random() < 0.5 else math.exp(-xi) * (1 + 0.3 * r.random()) for xi in x]
    got, want = stats.spearman(x, y), scipy_stats.spearmanr(x, y)
    assert got.diff == pytest.approx(want.statistic, abs=1e-12)
    assert got.p == pytest.approx(want.pvalue, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("seed,n,m", [(0, 3, 3), (1, 3, 4), (2, 5, 2), (3, 7, 7), (4, 1, 5)])
def test_mann_whitney_exact_matches_scipy_without_ties(seed, n, m):
    r = random.Random(seed)
    a = [r.lognormvariate(0, 2) for _ in range(n)]
    b = [r.lognormvariate(0.5, 2) for _ in range(m)]
    want = scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
    assert stats.mann_whitney_exact(a, b) == pytest.approx(want, rel=1e-12)


def test_mann_whitney_exact_by_hand_and_with_ties():
    # 3 against 3, complete separation: 1 split of 20 as extreme on each side -> 2 / 20
    assert stats.mann_whitney_exact([4e-3, 5e-3, 7e-3], [1e-4, 2e-4, 3e-4]) == pytest.approx(0.1)
    assert stats.mann_whitney_exact([1e-4, 2e-4, 3e-4], [4e-3, 5e-3, 7e-3]) == pytest.approx(0.1)
    # ties (radii of 0): the permutation p over the tie-averaged ranks, checked by brute force
    a, b = [0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 5.0]
    pooled = stats.ranks(a + b)
    sums = [sum(pooled[i] for i in c) for c in itertools.combinations(range(7), 3)]
    r = sum(pooled[:3])
    want = min(1.0, 2 * min(sum(s <= r for s in sums), sum(s >= r for s in sums)) / len(sums))
    assert stats.mann_whitney_exact(a, b) == pytest.approx(want)
    assert stats.mann_whitney_exact([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert stats.mann_whitney_exact([], [1.0]) is None
    assert stats.mann_whitney_exact(list(range(30)), list(range(30)), max_splits=1000) is None


@pytest.mark.parametrize("a,b", [([0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 5.0]),          # radii of 0 tied
                                 ([0.0, 0.0, 2e-4, 1e-4], [0.0, 0.0, 0.0]),
                                 ([1.0, 2.0, 2.0], [2.0, 3.0, 3.0])])
def test_mann_whitney_exact_with_ties_matches_scipys_exact_permutation_test(a, b):
    import numpy as np

    def rank_sum(x, y):  # a's rank sum in the pooled sample, ties averaged (scipy's rankdata)
        return scipy_stats.rankdata(np.concatenate([x, y]))[:len(x)].sum()

    want = scipy_stats.permutation_test((a, b), rank_sum, permutation_type="independent", vectorized=False,
                                        n_resamples=np.inf, alternative="two-sided").pvalue
    assert stats.mann_whitney_exact(a, b) == pytest.approx(want, rel=1e-9)


def test_spearman_degenerate_cases():
    assert stats.spearman([1, 2], [3, 4]) is None                   # < 3 pairs
    assert stats.spearman([1, 2, 3], [0, 0, 0]) is None             # a constant side: r undefined
    perfect = stats.spearman([1, 2, 3, 4], [0.1, 0.2, 0.5, 9.0])
    assert perfect.diff == 1.0 and perfect.p == 0.0
    assert stats.ranks([5.0, 0.0, 0.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]
    with pytest.raises(ValueError):
        stats.spearman([1, 2, 3], [1, 2])
