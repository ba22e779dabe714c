"""Paired comparisons: relative differences, bootstrap intervals, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_env.tools.paired_stats import (
    NO_DIFFERENCE,
    bootstrap_mean_ci,
    compare_paired,
    relative_differences,
    verdict,
)


def test_relative_differences_are_per_seed_fractions_of_the_baseline():
    diffs = relative_differences([1.1, 1.8, 3.0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(diffs, [0.1, -0.1, 0.0])


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_constant_shift_gives_a_zero_width_interval_at_the_shift(rng, method):
    baseline = rng.uniform(1.0, 5.0, size=12)
    result = compare_paired(baseline * 0.97, baseline, method=method)
    assert result.mean == pytest.approx(-0.03, abs=1e-12)
    assert result.low == pytest.approx(-0.03, abs=1e-12)
    assert result.high == pytest.approx(-0.03, abs=1e-12)
    assert result.verdict == "better"
    assert compare_paired(baseline * 1.02, baseline, method=method).verdict == "worse"


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_symmetric_noise_around_zero_shows_no_difference(rng, method):
    half = rng.normal(0.0, 0.05, size=10)
    diffs = np.concatenate([half, -half])  # mean exactly 0, symmetric
    low, high = bootstrap_mean_ci(diffs, method=method)
    assert low < 0.0 < high
    assert verdict(low, high) == NO_DIFFERENCE


def test_interval_is_reproducible_for_a_fixed_seed_and_moves_with_the_seed(rng):
    diffs = rng.normal(0.01, 0.02, size=15)
    first = bootstrap_mean_ci(diffs, seed=7)
    assert bootstrap_mean_ci(diffs, seed=7) == first
    assert bootstrap_mean_ci(diffs, seed=8) != first


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_interval_covers_the_true_shift_of_normal_differences(rng, method):
    diffs = rng.normal(-0.05, 0.02, size=40)
    low, high = bootstrap_mean_ci(diffs, method=method)
    assert low < -0.05 < high
    assert high - low == pytest.approx(2 * 1.96 * 0.02 / np.sqrt(40), rel=0.35)
    assert verdict(low, high) == "better"


def test_bca_shifts_the_interval_of_a_skewed_sample_towards_its_tail(rng):
    diffs = rng.exponential(1.0, size=30)
    p_low, p_high = bootstrap_mean_ci(diffs, method="percentile")
    b_low, b_high = bootstrap_mean_ci(diffs, method="bca")
    assert b_low > p_low and b_high > p_high  # right-skewed: BCa moves right
    assert b_low < diffs.mean() < b_high


def test_verdict_follows_the_metric_direction():
    assert verdict(0.01, 0.05) == "worse"
    assert verdict(0.01, 0.05, lower_is_better=False) == "better"
    assert verdict(-0.05, -0.01, lower_is_better=False) == "worse"
    assert verdict(-0.01, 0.0) == NO_DIFFERENCE


@pytest.mark.parametrize("call, message", [
    (lambda: relative_differences([1.0, 2.0], [1.0, 0.0]), "baseline=0.0"),
    (lambda: relative_differences([1.0, 2.0], [1.0, 2.0, 3.0]), "shapes (2,) and (3,)"),
    (lambda: relative_differences([1.0, np.nan], [1.0, 1.0]), "finite"),
    (lambda: bootstrap_mean_ci([0.1]), "at least 2 values"),
    (lambda: bootstrap_mean_ci([0.1, 0.2], confidence=1.0), "confidence=1.0"),
    (lambda: bootstrap_mean_ci([0.1, 0.2], resamples=10), "resamples=10"),
    (lambda: bootstrap_mean_ci([0.1, 0.2], method="basic"), "method='basic'"),
    (lambda: verdict(0.2, 0.1), "low=0.2 > high=0.1"),
])
def test_bad_input_names_the_field_and_value(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_comparison_prints_mean_interval_and_verdict():
    text = str(compare_paired([0.9, 0.9, 0.9], [1.0, 1.0, 1.0]))
    assert text.startswith("-10.00% [-10.00%, -10.00%] (3 seeds): better")
