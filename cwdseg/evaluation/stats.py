"""Statistics of a comparison over seeds: the t-interval of a mean, and the difference of two methods'
means with its interval (Welch, or paired by seed).

Why these: a distillation gain is a difference of two means over a handful of seeds (usually 3),
so the normal quantile 1.96 would be far too narrow; the Student t quantile with n - 1 degrees of
freedom is the textbook interval. Two methods trained with the same seeds in this toolkit see the
same data order (``TrainSampleStream(seed)``) and the same initialisation of their shared parts, so
their results are paired by seed; the paired interval (t on the per-seed differences, n - 1 df) then
removes the seed-to-seed variation both share. Without that pairing (different seed sets) the Welch
interval is used: standard error sqrt(s_a^2/n_a + s_b^2/n_b), degrees of freedom from the
Welch-Satterthwaite equation (not rounded).

The t quantile is computed here (regularised incomplete beta by its continued fraction, then
bisection), so scipy is not a runtime dependency; tests compare against ``scipy.stats``.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

LEVEL = 0.95


# --------------------------------------------------------------------------------------------------
# The Student t distribution
# --------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz), for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, need not be an integer) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanInterval:
    n: int
    mean: float
    std: float | None        # sample standard deviation (n - 1); None for n = 1
    low: float | None        # the t-interval of the mean; None for n = 1
    high: float | None
    df: int | None
    level: float = LEVEL

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """``a - b`` (a method minus its baseline), its interval and the test that gave it."""
    diff: float
    low: float | None
    high: float | None
    se: float | None
    df: float | None
    p_value: float | None    # two-sided, H0: no difference
    test: str                # "paired" (by seed), "welch", or "none" (too few runs for an interval)
    n_a: int
    n_b: int
    level: float = LEVEL

    @property
    def spans_zero(self) -> bool | None:
        """Whether the interval contains 0 (the data do not tell the sign of the difference); None without one."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0.0 <= self.high

    def to_json(self) -> dict:
        return asdict(self) | {"spans_zero": self.spans_zero}


def mean_interval(values: Sequence[float], level: float = LEVEL) -> MeanInterval:
    """Mean, sample std and the t-interval ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return MeanInterval(1, mean, None, None, None, None, level)
    std = statistics.stdev(values)
    half = t_ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return MeanInterval(n, mean, std, mean - half, mean + half, n - 1, level)


def _difference(diff: float, se: float, df: float, test: str, n_a: int, n_b: int, level: float) -> Difference:
    if se == 0.0:  # identical runs: a zero-width interval, and no evidence either way if diff is 0
        return Difference(diff, diff, diff, 0.0, df, 1.0 if diff == 0 else 0.0, test, n_a, n_b, level)
    half = t_ppf(0.5 + level / 2, df) * se
    p = 2.0 * (1.0 - t_cdf(abs(diff) / se, df))
    return Difference(diff, diff - half, diff + half, se, df, p, test, n_a, n_b, level)


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a) - mean(b) with Welch's interval: se^2 = s_a^2/n_a + s_b^2/n_b,
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)) (Welch-Satterthwaite)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None, None, None, "none", len(a), len(b), level)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se2 > 0 else float(len(a) + len(b) - 2)
    return _difference(diff, math.sqrt(se2), df, "welch", len(a), len(b), level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Difference:
    """mean over seeds of a[seed] - b[seed], with the t-interval of those differences (n - 1 df).
    The two mappings (seed -> value) must hold the same seeds."""
    if set(a) != set(b):
        raise ValueError(f"paired_difference needs the same seeds, got {sorted(a)} and {sorted(b)}")
    d = [float(a[s]) - float(b[s]) for s in sorted(a)]
    diff = statistics.fmean(d)
    if len(d) < 2:
        return Difference(diff, None, None, None, None, None, "none", len(d), len(d), level)
    return _difference(diff, statistics.stdev(d) / math.sqrt(len(d)), len(d) - 1, "paired", len(d), len(d), level)


def compare_to_baseline(method: Mapping[int, float], baseline: Mapping[int, float], paired: bool = True,
                        level: float = LEVEL) -> Difference:
    """The method's difference to its baseline: paired by seed when ``paired`` and both hold the same
    seeds (each seed fixes the data order and initialisation, so such runs are pairs), Welch otherwise."""
    if paired and set(method) == set(baseline) and len(method) >= 2:
        return paired_difference(method, baseline, level)
    return welch_difference(list(method.values()), list(baseline.values()), level)
