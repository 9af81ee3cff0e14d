"""Confidence intervals and seed summaries against published values and textbook formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.stats import bootstrap_interval, bootstrap_ratio_interval, problem_interval, seed_summary, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [  # Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I, method 3 (Wilson)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombes_table(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)


def test_bootstrap_of_a_mean_agrees_with_the_normal_interval_on_a_large_sample():
    x = np.random.default_rng(1).uniform(0, 1, size=2000)
    lo, hi = bootstrap_interval(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.004) and hi == pytest.approx(x.mean() + half, abs=0.004)
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no spread, no interval
    assert bootstrap_interval(x) == (lo, hi)  # seeded: the same inputs give the same interval


def test_ratio_bootstrap_resamples_pairs():
    """With equal denominators the ratio of sums is the mean of num / d: the intervals coincide."""
    num = np.random.default_rng(2).exponential(2.0, size=300)
    lo, hi = bootstrap_ratio_interval(num, np.full(300, 4.0))
    blo, bhi = bootstrap_interval(num / 4.0)
    assert lo == pytest.approx(blo, rel=0.02) and hi == pytest.approx(bhi, rel=0.02)
    # paired: a document twice as long has twice the nats; the ratio is exactly 2 in every resample
    den = np.random.default_rng(3).integers(10, 100, size=50).astype(float)
    assert bootstrap_ratio_interval(2 * den, den) == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ratio_interval([1.0, 2.0], [1.0])


def test_problem_interval_picks_wilson_for_binary_outcomes():
    assert problem_interval([1, 0, 0, 0]) == wilson_interval(1, 4)
    lo, hi = problem_interval([0.25, 0.5, 0.75, 1.0, 0.0])
    assert 0 <= lo < 0.5 < hi <= 1


def test_seed_summary_is_the_t_interval():
    s = seed_summary([0.10, 0.16, 0.13])
    assert s["mean"] == pytest.approx(0.13) and s["sd"] == pytest.approx(0.03) and s["n"] == 3
    half = 4.302653 * 0.03 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert s["ci_low"] == pytest.approx(0.13 - half, rel=1e-5) and s["ci_high"] == pytest.approx(0.13 + half, rel=1e-5)
    one = seed_summary([0.2])
    assert one["n"] == 1 and math.isnan(one["sd"])
