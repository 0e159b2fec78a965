"""Small-sample statistics for comparing methods over seeds: mean, sample std, Welch's and the
paired t-test with two-sided p-values, the exact Mann-Whitney test, Spearman's rank correlation, the exact McNemar test for paired yes/no outcomes,
Holm's step-down adjustment for a family of tests, and the seeds per method a Welch test needs for
a given power (to plan the next run from a pilot's differences and spreads).

Written out (no scipy at run time: it is a test-only dependency) because the comparison tables
need exactly these and nothing else; tests check them against scipy.stats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from statistics import NormalDist
from typing import List, Optional, Sequence

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class TTest:
    kind: str            # "welch", "paired" or "spearman"
    diff: float          # mean(a) - mean(b); Spearman's r for "spearman"
    t: float
    df: float
    p: float
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[TTest]:
    """Welch's unequal-variance t-test of mean(a) = mean(b); None below 2 values per side.
    Both variances 0: p = 1 if the means are equal, else 0 (the t statistic is infinite)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    diff = mean(a) - mean(b)
    se2 = va + vb
    if se2 == 0:
        return TTest("welch", diff, 0.0 if diff == 0 else math.copysign(math.inf, diff), float(len(a) + len(b) - 2),
                     1.0 if diff == 0 else 0.0, len(a), len(b))
    t = diff / math.sqrt(se2)
    df = se2 ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    return TTest("welch", diff, t, df, t_two_sided_p(t, df), len(a), len(b))


def paired(a: Sequence[float], b: Sequence[float]) -> Optional[TTest]:
    """Paired t-test on a[i] - b[i] (e.g. the same seed and data order); None below 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    m, s = mean(d), std(d)
    df = float(len(d) - 1)
    if s == 0:
        return TTest("paired", m, 0.0 if m == 0 else math.copysign(math.inf, m), df, 1.0 if m == 0 else 0.0,
                     len(a), len(b))
    t = m / (s / math.sqrt(len(d)))
    return TTest("paired", m, t, df, t_two_sided_p(t, df), len(a), len(b))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired yes/no outcomes (e.g. a search converged under
    two settings, same seed): ``b``, ``c`` = pairs where only the first / only the second said
    yes; under H0 each discordant pair is a fair coin, so p = P(Binomial(b + c, 1/2) as extreme)."""
    if b < 0 or c < 0:
        raise ValueError(f"McNemar counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def ranks(xs: Sequence[float]) -> List[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def mann_whitney_exact(a: Sequence[float], b: Sequence[float], max_splits: int = 2_000_000) -> Optional[float]:
    """Two-sided exact Mann-Whitney (Wilcoxon rank-sum) p: every split of the pooled (tie-averaged)
    ranks into groups of len(a) and len(b) is equally likely under H0, and p = min(1, 2 min(P(R <= r),
    P(R >= r))) for a's rank sum r (scipy's ``method="exact"`` without ties; with ties it is the
    exact permutation p conditional on them). For a few seeds a side, where the t-test's normality
    is a guess and a scale spanning decades lets one value rule a mean. None if a side is empty or
    the splits exceed ``max_splits`` (the enumeration is C(n + m, n))."""
    n, m = len(a), len(b)
    if n == 0 or m == 0 or math.comb(n + m, n) > max_splits:
        return None
    rk = ranks(list(a) + list(b))
    r = sum(rk[:n])
    le = ge = total = 0
    for idx in combinations(range(n + m), n):
        s = sum(rk[i] for i in idx)
        total += 1
        le += s <= r + 1e-9
        ge += s >= r - 1e-9
    return min(1.0, 2 * min(le, ge) / total)


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[TTest]:
    """Spearman's rank correlation (Pearson's r on tie-averaged ranks) in ``diff``, with the
    two-sided p of t = r sqrt((n - 2) / (1 - r^2)) on n - 2 df (scipy.stats.spearmanr's). None
    below 3 pairs or where a side has a single value (r undefined). Many tied values (radii of 0)
    are allowed: that is what the average ranks are for."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    df = float(len(x) - 2)
    t = math.copysign(math.inf, r) if abs(r) == 1.0 else r * math.sqrt(df / (1.0 - r * r))
    return TTest("spearman", r, t, df, t_two_sided_p(t, df), len(x), len(y))


def holm(ps: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (family-wise error): with the m defined p-values
    sorted, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)); an adjusted p <= alpha
    exactly when Holm's procedure at level alpha rejects that hypothesis. None stays None and is
    not counted in m. Needed because the comparison report runs many tests at n = 3."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, out, run = len(order), [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(order):
        run = max(run, min(1.0, (m - rank) * p))
        out[i] = run
    return out


def t_two_sided_critical(alpha: float, df: float) -> float:
    """c with P(|T| >= c) = alpha for Student's t (bisection on ``t_two_sided_p``)."""
    if not 0.0 < alpha < 1.0 or df <= 0:
        raise ValueError(f"need 0 < alpha < 1 and df > 0, got alpha={alpha}, df={df}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def welch_power(diff: float, sd_a: float, sd_b: float, n: int, alpha: float = 0.05, sims: int = 20000,
                seed: int = 0) -> float:
    """Power of Welch's two-sided test at level alpha with n values a side, when the true means
    differ by diff and the true sds are sd_a, sd_b (normal values), by simulating the test itself:
    the usual noncentral-t formula is 7-10 points optimistic at n = 3, where the estimated df
    costs power. Each decision is exact: critical values are interpolated over Welch's df range
    [n - 1, 2n - 2] and every statistic within 1% of its interpolated critical value is decided
    by its own p-value. Monte Carlo sd <= 0.5 / sqrt(sims)."""
    if n < 2:
        raise ValueError(f"Welch's test needs n >= 2 a side, got {n}")
    if sd_a == 0 and sd_b == 0:
        return 0.0 if diff == 0 else 1.0
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((sims, n)) * sd_a + diff
    b = rng.standard_normal((sims, n)) * sd_b
    va, vb = a.var(axis=1, ddof=1) / n, b.var(axis=1, ddof=1) / n
    t = np.abs(a.mean(axis=1) - b.mean(axis=1)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
    grid = np.linspace(n - 1, 2 * n - 2, 33)
    c = np.interp(df, grid, [t_two_sided_critical(alpha, float(g)) for g in grid])
    reject = t > c
    for i in np.flatnonzero(np.abs(t - c) <= 0.01 * c):
        reject[i] = t_two_sided_p(float(t[i]), float(df[i])) < alpha
    return float(reject.mean())


def seeds_for_power(diff: float, sd_a: float, sd_b: float, alpha: float = 0.05, power: float = 0.8,
                    n_max: int = 30) -> Optional[int]:
    """The fewest values a side (seeds per method) at which Welch's test at level alpha has the
    given power for this true difference and these true sds; None if more than n_max (or diff =
    0). For planning the next run from a pilot's estimates, which are themselves uncertain. The
    scan starts where the z-test with known variances (always at least as powerful) first
    reaches the power, so hopeless cases return at once."""
    if diff == 0:
        return None
    se1 = math.sqrt(sd_a ** 2 + sd_b ** 2)
    if se1 == 0:
        return 2
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    start = next((n for n in range(2, n_max + 1)
                  if _norm_cdf(abs(diff) * math.sqrt(n) / se1 - z) + _norm_cdf(-abs(diff) * math.sqrt(n) / se1 - z)
                  >= power), None)
    if start is None:
        return None
    return next((n for n in range(start, n_max + 1) if welch_power(diff, sd_a, sd_b, n, alpha) >= power), None)


def _norm_cdf(x: float) -> float:
    return NormalDist().cdf(x)
