"""How sure a measured number is: confidence intervals over problems and summaries over seeds.

Every figure the eval stage reports is a mean over a finite set of problems (or documents), and post-training
figures also depend on the seed of the run. Three intervals cover them, all at 95% by default:

- `wilson_interval(successes, n)`: one binary outcome per problem (greedy pass@1, FIM exact match). The Wilson score
  interval (Wilson 1927) keeps its coverage near 0 and 1, where the normal approximation collapses to a point
  (0 of 16 right is not "0 +- 0"). Computed by `scipy.stats.binomtest(...).proportion_ci(method="wilson")`.
- `bootstrap_interval(values)`: a mean of per-problem values that are not binary (pass@1 averaged over k samples,
  unbiased pass@k): the percentile bootstrap over problems (`scipy.stats.bootstrap`), so the unit resampled is the
  problem, not the sample (k samples of one prompt are not independent evidence).
- `bootstrap_ratio_interval(num, den)`: a ratio of sums over documents (bits per byte = sum of nats / sum of bytes,
  ln 2 aside), resampling documents with their numerator and denominator paired.

`problem_interval(values)` picks Wilson when every value is 0 or 1 and the bootstrap otherwise. `seed_summary(xs)`
gives the mean, the sample standard deviation (ddof 1) and Student's t interval of the mean over N seeds (N >= 2).
Resampling uses a fixed seed, so the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n."""
    if not 0 <= successes <= n or n < 1:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    if np.all(x == x[0]):  # every resample has the same mean
        return float(x[0]), float(x[0])
    res = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ratio_interval(
    num: Sequence[float],
    den: Sequence[float],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling (num_i, den_i) pairs."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"num and den must be non-empty and of one length, got {a.shape} and {b.shape}")
    if a.size == 1:
        r = float(a[0] / b[0])
        return r, r

    def ratio(x, y, axis=-1):
        return x.sum(axis=axis) / np.maximum(y.sum(axis=axis), 1e-300)

    res = stats.bootstrap(
        (a, b),
        ratio,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def problem_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson for binary per-problem outcomes, the bootstrap over problems for anything else."""
    x = np.asarray(values, dtype=np.float64)
    if x.size and np.all((x == 0) | (x == 1)):
        return wilson_interval(int(x.sum()), int(x.size), confidence)
    return bootstrap_interval(x, confidence)


def seed_summary(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, sample standard deviation and Student's t interval of the mean of a metric over N seeds."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        raise ValueError("no finite values to summarize")
    out = {"mean": float(x.mean()), "n": int(x.size)}
    if x.size < 2:
        return out | {"sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * sd / math.sqrt(x.size)
    return out | {"sd": sd, "ci_low": out["mean"] - half, "ci_high": out["mean"] + half}
