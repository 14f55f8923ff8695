"""Small statistics for the demo's table: mean ± std and the paired t-test (no scipy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Paired", "betainc", "mean_std", "paired_test"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n − 1`` denominator; 0 for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``x`` in [0, 1].

    .. note::
        ``I_x(a,b) = x^a (1−x)^b / (a·B(a,b)) · 1/(1 + d₁/(1 + d₂/(1 + …)))`` with
        ``d₂ₘ₊₁ = −(a+m)(a+b+m)x / ((a+2m)(a+2m+1))`` and ``d₂ₘ = m(b−m)x / ((a+2m−1)(a+2m))``,
        evaluated with the modified Lentz method; for ``x > (a+1)/(a+b+2)`` the symmetry
        ``I_x(a,b) = 1 − I_{1−x}(b,a)`` keeps the fraction in its fast-converging range.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)) - math.log(a))
    # Lentz: f = 1 + d1/(1 + d2/(1 + ...)), so I = front / f
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, 400):
        m = j // 2
        if j % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return math.exp(log_front) / f


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic: ``P(|T| ≥ |t|) = I_{df/(df+t²)}(df/2, 1/2)``."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


@dataclass(frozen=True)
class Paired:
    """A paired comparison ``a − b`` over seeds."""

    diff_mean: float
    diff_std: float
    p_value: float  # two-sided paired t-test; NaN with fewer than 2 pairs
    wins: int  # pairs with a > b
    n: int


def paired_test(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired two-sided t-test of ``a − b`` (scipy's ``ttest_rel`` when scipy is installed).

    Differences that are all equal give p = 1 when they are 0 and NaN otherwise (the t statistic
    is undefined; scipy gives NaN as well).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(diffs)
    n = len(diffs)
    wins = sum(d > 0 for d in diffs)
    if n < 2:
        return Paired(m, s, math.nan, wins, n)
    if s == 0.0:  # the t statistic is undefined (scipy gives NaN too)
        return Paired(m, s, 1.0 if m == 0.0 else math.nan, wins, n)
    try:
        from scipy import stats  # optional, used when present
    except ImportError:
        p = t_two_sided_p(m / (s / math.sqrt(n)), n - 1)
    else:
        p = float(stats.ttest_rel(list(a), list(b)).pvalue)
    return Paired(m, s, p, wins, n)
