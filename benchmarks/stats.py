"""Repeats, median and spread for the benchmarks: what every reported number is made of.

Every figure a benchmark prints is the median of repeated measurements taken after warm-up calls, shown
with its spread: the interquartile range (IQR, 25th to 75th percentile, linear interpolation between order
statistics as ``numpy.percentile``'s default) and min-max. A ratio of two medians comes with a warning when
the spread of either side is larger than the difference between them: such a ratio is noise, not a result.

Measurements of settings that are compared are taken *interleaved* (A B B A A B ...), so that load from
other processes on a shared machine falls on both sides alike; see :func:`interleaved`.

Used by ``bench_*.py`` as a sibling module (``import stats``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

__all__ = ["Summary", "percentile", "summarize", "repeat", "interleaved", "ratio_warning", "QUICK_BANNER"]

QUICK_BANNER = ("--quick: a smoke test of the benchmark code (few repeats, small sizes); its numbers are not "
                "results and its ratios are not comparisons.")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of ``n`` repeated measurements (any unit; the benchmark says which)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def scaled(self, factor: float) -> "Summary":
        """The same summary in another unit (e.g. seconds -> ms), or per item (factor 1/items)."""
        return Summary(self.median * factor, self.q1 * factor, self.q3 * factor, self.min * factor,
                       self.max * factor, self.n)

    def inverse(self, numerator: float = 1.0) -> "Summary":
        """``numerator / x`` of every value (time per item -> items per second); the quartiles swap sides."""
        return Summary(numerator / self.median, numerator / self.q3, numerator / self.q1, numerator / self.max,
                       numerator / self.min, self.n)

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr}

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> "Summary":
        """Inverse of :meth:`as_dict` (the JSON rows of a benchmark)."""
        return cls(d["median"], d["q1"], d["q3"], d["min"], d["max"], int(d["n"]))

    def text(self, digits: int = 1) -> str:
        """``12.3 (IQR 11.9-12.8, min-max 11.5-14.0, n=8)``."""
        f = f"{{:.{digits}f}}"
        if self.n == 1:
            return f"{f.format(self.median)} (n=1, no spread)"
        return (f"{f.format(self.median)} (IQR {f.format(self.q1)}-{f.format(self.q3)}, "
                f"min-max {f.format(self.min)}-{f.format(self.max)}, n={self.n})")

    def cell(self, digits: int = 1) -> str:
        """Compact table cell: ``12.3 ±0.4`` (half the IQR)."""
        if self.n == 1:
            return f"{self.median:.{digits}f} (n=1)"
        return f"{self.median:.{digits}f} ±{self.iqr / 2:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Median, quartiles, min and max of the values."""
    if not values:
        raise ValueError("summarize needs at least one value")
    return Summary(percentile(values, 50), percentile(values, 25), percentile(values, 75), min(values), max(values),
                   len(values))


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1,
           sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls (``sync`` after each call,
    e.g. ``torch.cuda.synchronize``, so that the time covers the work and not its launch)."""
    return interleaved({"fn": fn}, repeats, warmup, sync)["fn"]


def interleaved(fns: Mapping[str, Callable[..., object]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, with_round: bool = False,
                after_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each function, taken in alternating order.

    Round r calls the functions in the given order for even r and in reverse order for odd r (A B, B A, A B,
    ...), so slow drifts of the machine's load and "who runs right after whom" effects fall on every function
    alike. Each function first gets ``warmup`` untimed calls (allocator, caches, lazy initialisation).
    With ``with_round`` each call gets the round number (warm-up calls: -1 - k), e.g. to pick the sample
    that every function of the round processes. ``after_round(r)``, untimed, follows each timed round (e.g. to
    check that all functions gave the same output).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for k in range(warmup):
        for name in names:
            fns[name](-1 - k) if with_round else fns[name]()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name](r) if with_round else fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
        if after_round is not None:
            after_round(r)
    return times


def ratio_warning(a: Summary, b: Summary, what: str = "ratio") -> str | None:
    """A warning when the spread (IQR) of either side is larger than the difference of the medians."""
    difference = abs(a.median - b.median)
    spread = max(a.iqr, b.iqr)
    if a.n < 2 or b.n < 2:
        return f"warning: {what} from single measurements, no spread known: not a result"
    if spread > difference:
        return (f"warning: {what}: spread (IQR up to {spread:.3g}) larger than the difference of the medians "
                f"({difference:.3g}); the two are not distinguishable in this run")
    return None
