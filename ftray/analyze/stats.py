"""One-sided Welch t-test (unequal variances), as the behaviour-shift paper compares IFA(base) < IFA(tuned).

Written here rather than imported: scipy is not one of ftray's dependencies (scipy.stats.ttest_ind with
equal_var=False, alternative="less" is the same test), and the Student-t survival function needs only
the regularised incomplete beta function, a short continued fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, variance


@dataclass
class Welch:
    """Result of testing H1: mean(b) > mean(a)."""

    mean_a: float
    mean_b: float
    t: float
    df: float
    p: float


def _betacf(a: float, b: float, x: float) -> float:
    # modified Lentz's method for the continued fraction of I_x(a, b) (Numerical Recipes §6.4)
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch_greater(a: list[float], b: list[float]) -> Welch:
    """Welch's t-test of H1: mean(b) > mean(a) (t = (mean b − mean a) / se, Welch–Satterthwaite df)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per group, got {len(a)} and {len(b)}")
    ma, mb = mean(a), mean(b)
    va, vb = variance(a) / len(a), variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:  # both groups constant: the difference is certain, or there is none
        t = 0.0 if mb == ma else math.copysign(math.inf, mb - ma)
        return Welch(ma, mb, t, float(len(a) + len(b) - 2), 0.5 if t == 0 else t_sf(t, 1.0))
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = (mb - ma) / math.sqrt(se2)
    return Welch(ma, mb, t, df, t_sf(t, df))
