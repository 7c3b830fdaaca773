"""benchmarks/stats.py: median, quartiles and the noise warning against hand computations."""
from __future__ import annotations

import statistics

import pytest

from benchmarks import stats


def hand_percentile(values, q):
    """Linear interpolation between ranks, written out: rank = (n - 1) q / 100."""
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    below = int(rank)
    frac = rank - below
    if below + 1 >= len(xs):
        return xs[-1]
    return xs[below] * (1 - frac) + xs[below + 1] * frac


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [4.0, 1.0, 3.0, 2.0], [9, 1, 8, 2, 7, 3, 6, 4, 5],
                                    [0.5, 10.0, 0.7, 0.6, 0.55, 0.65]])
def test_summary_matches_hand_computation(values):
    s = stats.summarize(values)
    assert s.median == pytest.approx(statistics.median(values))
    assert s.q1 == pytest.approx(hand_percentile(values, 25))
    assert s.q3 == pytest.approx(hand_percentile(values, 75))
    assert (s.min, s.max, s.n) == (min(values), max(values), len(values))
    assert s.iqr == pytest.approx(hand_percentile(values, 75) - hand_percentile(values, 25))


def test_quartiles_of_a_known_list():
    # 1..9: rank of Q1 = 8 * 0.25 = 2 -> the third value, 3; Q3 -> the seventh, 7.
    s = stats.summarize(list(range(1, 10)))
    assert (s.q1, s.median, s.q3) == (3, 5, 7)
    # 1..4: Q1 rank 0.75 -> 1 + 0.75 * (2 - 1) = 1.75; Q3 rank 2.25 -> 3.25.
    s = stats.summarize([1, 2, 3, 4])
    assert (s.q1, s.median, s.q3) == (1.75, 2.5, 3.25)


def test_inverse_and_scaled():
    s = stats.summarize([2.0, 4.0, 5.0, 10.0])
    per_s = s.inverse(100.0)
    assert per_s.median == pytest.approx(100 / 4.5)
    assert per_s.min == pytest.approx(10.0) and per_s.max == pytest.approx(50.0)
    assert per_s.q1 == pytest.approx(100 / s.q3) and per_s.q3 == pytest.approx(100 / s.q1)
    ms = s.scaled(1e3)
    assert (ms.median, ms.q1, ms.max) == pytest.approx((4500.0, s.q1 * 1e3, 10000.0))


def test_ratio_warning_only_when_spread_exceeds_the_difference():
    tight_a = stats.summarize([10.0, 10.1, 10.2, 10.3])  # IQR 0.15
    tight_b = stats.summarize([12.0, 12.1, 12.2, 12.3])
    assert stats.ratio_warning(tight_a, tight_b) is None
    wide = stats.summarize([8.0, 10.0, 14.0, 16.0])  # median 12, IQR 4.5 > |12 - 10.15|
    assert "spread" in stats.ratio_warning(tight_a, wide)
    single = stats.summarize([1.0])
    assert "single" in stats.ratio_warning(single, tight_b)


def test_interleaved_alternates_order_and_excludes_warmup():
    calls = []
    times = stats.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "b", "a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [3, 3] and all(t >= 0 for t in times["a"] + times["b"])
    assert len(stats.repeat(lambda: None, repeats=4, warmup=0)) == 4


def test_text_names_the_spread():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.text() == "3.0 (IQR 2.0-4.0, min-max 1.0-5.0, n=5)"
    assert s.cell() == "3.0 ±1.0"
    assert "no spread" in stats.summarize([2.0]).text()
