"""bench.stats: medians, spread, bootstrap intervals, paired ratios, interleaved rounds."""

from __future__ import annotations

import math

import pytest

from bench.stats import bootstrap_ci, diff_ci, fmt, interleaved, paired_ratio, percentile, summary


def test_summary_reports_median_range_iqr_and_a_ci_that_brackets_the_median():
    s = summary([5.0, 1.0, 3.0, 4.0, 2.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (5, 3.0, 1.0, 5.0)
    assert s["iqr"] == [2.0, 4.0]
    lo, hi = s["ci"]
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
    assert summary([]) == {"n": 0}
    assert fmt(s, 1000, 0) == "3000 [1000–5000]"


def test_ci_narrows_with_more_samples():
    few = [10.0 + (i % 5) for i in range(6)]
    many = few * 20
    w_few = bootstrap_ci(few)[1] - bootstrap_ci(few)[0]
    w_many = bootstrap_ci(many)[1] - bootstrap_ci(many)[0]
    assert w_many < w_few
    assert all(math.isnan(x) for x in bootstrap_ci([1.0]))


def test_paired_ratio_is_per_round_and_rejects_unpaired_input():
    r = paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert (r["median"], r["min"], r["max"]) == (2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="one pair per round"):
        paired_ratio([1.0], [1.0, 2.0])


def test_diff_ci_resolves_a_clear_difference():
    a = [20.0 + 0.1 * (i % 7) for i in range(40)]
    b = [10.0 + 0.1 * (i % 5) for i in range(40)]
    d = diff_ci(a, b)
    assert 9.5 < d["ci"][0] <= d["diff"] <= d["ci"][1] < 10.6


def test_interleaved_rotates_the_order_and_times_every_round():
    calls: list[str] = []
    clock = iter(range(1000))
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")},
                        rounds=3, warmup=1, clock=lambda: float(next(clock)))
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t == 1.0 for v in times.values() for t in v)


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(percentile([], 50))
