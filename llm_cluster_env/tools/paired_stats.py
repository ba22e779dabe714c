"""Paired comparisons across seeds: mean relative difference, a bootstrap CI and a verdict.

Two routers run on the same seeds (the same arrivals) give one metric value each per seed. The
per-seed relative differences ``(candidate - baseline) / baseline`` remove most of what the
seeds' workloads add to each value; their mean gets a 95 % bootstrap interval (percentile, or
BCa with a jackknife acceleration), resampled from a fixed-seed generator so a report is
reproducible. :func:`verdict` says ``"better"`` or ``"worse"`` only when the interval excludes
0 (style guide, habit 16), else ``"no difference shown"``. Where a ratio means little (a hit
rate that may be 0), :func:`compare_paired_absolute` gives the same for the plain differences.

NumPy and the standard library only (``statistics.NormalDist`` for BCa's normal quantiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

METHODS = ("percentile", "bca")
NO_DIFFERENCE = "no difference shown"


def _paired_arrays(candidate, baseline) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 1-D arrays of one finite value per seed, or a ``ValueError``."""
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if c.ndim != 1 or c.shape != b.shape:
        raise ValueError(f"candidate and baseline: need two 1-D arrays of one value per seed, "
                         f"got shapes {c.shape} and {b.shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(b))):
        raise ValueError("candidate and baseline: values must be finite")
    return c, b


def relative_differences(candidate, baseline) -> np.ndarray:
    """``(candidate - baseline) / baseline`` per seed (fractions; -0.02 = 2 % lower).

    :param candidate: one metric value per seed (e.g. mean E2E latency, seconds).
    :param baseline: the baseline's values on the same seeds, in the same order (> 0).
    """
    c, b = _paired_arrays(candidate, baseline)
    if np.any(b <= 0):
        raise ValueError(f"baseline={float(b[b <= 0][0])!r}: values must be > 0 for a relative "
                         "difference")
    return (c - b) / b


def bootstrap_mean_ci(values, confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0, method: str = "percentile") -> tuple[float, float]:
    """Bootstrap interval of the mean of ``values`` (one per seed).

    :param values: at least 2 finite numbers.
    :param confidence: coverage of the interval, in (0, 1).
    :param resamples: bootstrap resamples (>= 100).
    :param seed: seed of the resampling generator (same inputs + seed = same interval).
    :param method: ``"percentile"`` or ``"bca"`` (bias-corrected and accelerated).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"values: need a 1-D array of at least 2 values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values: must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: must be in (0, 1)")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) \
            or resamples < 100:
        raise ValueError(f"resamples={resamples!r}: must be an integer >= 100")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    rng = np.random.default_rng(seed)
    n = x.size
    means = x[rng.integers(0, n, size=(int(resamples), n))].mean(axis=1)
    alpha = 1.0 - confidence
    lo_q, hi_q = alpha / 2.0, 1.0 - alpha / 2.0
    if method == "bca":
        lo_q, hi_q = _bca_quantiles(x, means, lo_q, hi_q)
    low, high = np.quantile(means, [lo_q, hi_q])
    # a constant sample: every resample mean equals it up to rounding
    if np.ptp(x) == 0.0:
        low = high = float(x[0])
    return float(low), float(high)


def _bca_quantiles(x: np.ndarray, means: np.ndarray, lo_q: float, hi_q: float
                   ) -> tuple[float, float]:
    """BCa-adjusted quantile levels (Efron 1987): bias ``z0`` from the share of resample means
    below the sample mean, acceleration from the jackknife means."""
    normal = NormalDist()
    estimate = x.mean()
    share = (np.count_nonzero(means < estimate) + 0.5 * np.count_nonzero(means == estimate)) \
        / means.size
    if share <= 0.0 or share >= 1.0:  # degenerate (e.g. constant sample): plain percentiles
        return lo_q, hi_q
    z0 = normal.inv_cdf(share)
    jack = (x.sum() - x) / (x.size - 1)
    d = jack.mean() - jack
    denom = 6.0 * float(np.sum(d * d)) ** 1.5
    accel = float(np.sum(d ** 3)) / denom if denom > 0 else 0.0

    def level(q: float) -> float:
        z = normal.inv_cdf(q)
        return normal.cdf(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))

    return level(lo_q), level(hi_q)


def verdict(low: float, high: float, lower_is_better: bool = True) -> str:
    """``"better"`` / ``"worse"`` when the interval ``[low, high]`` of ``candidate - baseline``
    excludes 0, else ``"no difference shown"``.

    :param lower_is_better: the metric improves downwards (latency); False for throughput.
    """
    if low > high:
        raise ValueError(f"low={low!r} > high={high!r}: not an interval")
    if low > 0.0:
        return "worse" if lower_is_better else "better"
    if high < 0.0:
        return "better" if lower_is_better else "worse"
    return NO_DIFFERENCE


@dataclass(frozen=True)
class PairedComparison:
    """A candidate against a baseline on the same seeds.

    :param mean: mean relative difference ``(candidate - baseline) / baseline`` (fraction).
    :param low: lower end of its bootstrap interval (fraction).
    :param high: upper end (fraction).
    :param seeds: paired seeds compared.
    :param confidence: the interval's coverage.
    :param lower_is_better: the metric's direction.
    :param relative: ``mean``, ``low`` and ``high`` are relative differences (fractions); False:
        absolute differences ``candidate - baseline``, in the metric's own units
        (:func:`compare_paired_absolute`).
    """

    mean: float
    low: float
    high: float
    seeds: int
    confidence: float
    lower_is_better: bool = True
    relative: bool = True

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high, self.lower_is_better)

    def __str__(self) -> str:
        if not self.relative:
            return (f"{self.mean:+.4g} [{self.low:+.4g}, {self.high:+.4g}] "
                    f"({self.seeds} seeds): {self.verdict}")
        return (f"{self.mean:+.2%} [{self.low:+.2%}, {self.high:+.2%}] "
                f"({self.seeds} seeds): {self.verdict}")


def compare_paired(candidate, baseline, confidence: float = 0.95, resamples: int = 10_000,
                   seed: int = 0, method: str = "percentile",
                   lower_is_better: bool = True) -> PairedComparison:
    """Mean relative difference of ``candidate`` vs ``baseline`` (one value per seed, same seed
    order) with its bootstrap interval (see :func:`bootstrap_mean_ci`)."""
    diffs = relative_differences(candidate, baseline)
    low, high = bootstrap_mean_ci(diffs, confidence, resamples, seed, method)
    return PairedComparison(float(diffs.mean()), low, high, int(diffs.size), confidence,
                            lower_is_better)


def absolute_differences(candidate, baseline) -> np.ndarray:
    """``candidate - baseline`` per seed, in the metric's units (for metrics where a ratio
    means little, e.g. a hit rate that may be 0).

    :param candidate: one metric value per seed.
    :param baseline: the baseline's values on the same seeds, in the same order.
    """
    c, b = _paired_arrays(candidate, baseline)
    return c - b


def compare_paired_absolute(candidate, baseline, confidence: float = 0.95,
                            resamples: int = 10_000, seed: int = 0,
                            method: str = "percentile",
                            lower_is_better: bool = True) -> PairedComparison:
    """Mean absolute difference ``candidate - baseline`` (the metric's units) with its
    bootstrap interval; otherwise as :func:`compare_paired`."""
    diffs = absolute_differences(candidate, baseline)
    low, high = bootstrap_mean_ci(diffs, confidence, resamples, seed, method)
    return PairedComparison(float(diffs.mean()), low, high, int(diffs.size), confidence,
                            lower_is_better, relative=False)


__all__ = ["METHODS", "NO_DIFFERENCE", "PairedComparison", "absolute_differences",
           "bootstrap_mean_ci", "compare_paired", "compare_paired_absolute",
           "relative_differences", "verdict"]
