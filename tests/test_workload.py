"""Workload generation: arrival processes, lengths, empirical summaries, trace replay/validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_env.config import ConfigError, PhaseConfig, WorkloadConfig
from llm_cluster_env.workload import (
    DATA_DIR,
    TraceError,
    Workload,
    WorkloadGenerator,
    available_empirical,
    clip_lengths,
    load_empirical,
    load_trace,
    phase_arrivals,
)

CONV = "processed_traces/splitwise_conv.csv"
ARXIV = "processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"


def write_trace(path: Path, rows: list[tuple], header: str = "arrived_at,num_prefill_tokens,"
                "num_decode_tokens") -> Path:
    """Write a small trace CSV (rows as tuples of already-formatted values)."""
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def gaps_cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


def mean_rate(times: np.ndarray) -> float:
    """Requests per second measured from the first to the last arrival."""
    return (len(times) - 1) / float(times[-1] - times[0])


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    """Five requests over 4 s (mean gap 1 s, mean rate 1 request/s)."""
    rows = [(0.5, 10, 5), (1.0, 20, 6), (2.5, 30, 7), (3.0, 40, 8), (4.5, 50, 9)]
    return write_trace(tmp_path / "small.csv", rows)


# --------------------------------------------------------------------------------------------
# Determinism and the Workload container
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"arrival": "poisson", "lengths": "empirical"},
    {"arrival": "gamma", "cv": 2.5, "lengths": "uniform"},
    {"arrival": "phases", "phases": (PhaseConfig(20.0, 2.0), PhaseConfig(10.0, 8.0)),
     "lengths": "empirical", "empirical": "arxiv_summarization"},
    {"arrival": "poisson", "lengths": "fixed"},
])
def test_same_seed_same_workload(kwargs):
    gen = WorkloadGenerator(WorkloadConfig(**kwargs), max_total_tokens=4096)
    first = gen.sample(500, np.random.default_rng(7))
    second = gen.sample(500, np.random.default_rng(7))
    other = gen.sample(500, np.random.default_rng(8))
    assert first == second
    assert not np.array_equal(first.arrival_times, other.arrival_times)
    assert len(first) == 500
    assert first.arrival_times.dtype == np.float64 and first.prompt_tokens.dtype == np.int64
    assert first.arrival_times[0] > 0  # synthetic processes draw the first gap
    assert np.all(np.diff(first.arrival_times) >= 0)


def test_trace_replay_is_deterministic(small_trace, rng):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace))
    gen = WorkloadGenerator(config, 4096)
    state = rng.bit_generator.state
    first = gen.sample(7, rng)
    rng.bit_generator.state = state
    assert gen.sample(7, rng) == first


def test_workload_is_validated_and_read_only():
    workload = Workload([0.0, 1.0], [3, 4], [5, 6])
    assert len(workload) == 2
    with pytest.raises(ValueError):
        workload.prompt_tokens[0] = 9
    with pytest.raises(ValueError, match="non-decreasing"):
        Workload([1.0, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        Workload([0.0], [1, 2], [1])
    with pytest.raises(ValueError, match=">= 1"):
        Workload([0.0], [0], [1])


def test_sample_rejects_a_non_generator():
    gen = WorkloadGenerator(WorkloadConfig(lengths="fixed"), 4096)
    with pytest.raises(TypeError, match="Generator"):
        gen.sample(10, np.random.RandomState(0))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Arrival processes
# --------------------------------------------------------------------------------------------


def test_poisson_rate_and_cv(rng):
    gen = WorkloadGenerator(WorkloadConfig(arrival="poisson", qps=8.0, lengths="fixed"), 4096)
    times = gen.sample(40_000, rng).arrival_times
    assert mean_rate(times) == pytest.approx(8.0, rel=0.03)  # s.e. 0.5 %
    assert gaps_cv(times) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_rate_and_cv(rng, cv):
    gen = WorkloadGenerator(WorkloadConfig(arrival="gamma", qps=4.0, cv=cv, lengths="fixed"), 4096)
    times = gen.sample(60_000, rng).arrival_times
    assert mean_rate(times) == pytest.approx(4.0, rel=0.04 * cv)  # s.e. cv/sqrt(n) ~ 1.2 %
    assert gaps_cv(times) == pytest.approx(cv, rel=0.08)


@pytest.mark.parametrize("cv", [1.0, 2.0])
def test_phase_rates_measured_per_phase(rng, cv):
    phases = (PhaseConfig(duration_s=60.0, qps=2.0), PhaseConfig(duration_s=30.0, qps=20.0))
    config = WorkloadConfig(arrival="phases", phases=phases, cv=cv, lengths="fixed")
    times = WorkloadGenerator(config, 4096).sample(100_000, rng).arrival_times
    cycles = int(times[-1] // 90.0)
    times = times[times < cycles * 90.0]  # whole cycles only
    position = np.mod(times, 90.0)
    low, high = position < 60.0, position >= 60.0
    assert low.sum() / (60.0 * cycles) == pytest.approx(2.0, rel=0.05)
    assert high.sum() / (30.0 * cycles) == pytest.approx(20.0, rel=0.05)
    segment = np.floor(times / 90.0) * 2 + high
    inside = segment[1:] == segment[:-1]  # gaps that do not span a phase boundary
    gaps = np.diff(times)
    for mask in (inside & high[1:], inside & low[1:]):
        assert gaps[mask].std() / gaps[mask].mean() == pytest.approx(cv, rel=0.1)


def test_phase_arrivals_with_short_phases_still_complete(rng):
    """Phases much shorter than a gap: many empty segments, rate = sum(qps*d)/sum(d) (Poisson)."""
    phases = (PhaseConfig(0.1, 0.5), PhaseConfig(0.2, 1.0))
    times = phase_arrivals(10_000, phases, 1.0, rng)
    assert len(times) == 10_000 and np.all(np.diff(times) >= 0)
    assert mean_rate(times) == pytest.approx((0.05 + 0.2) / 0.3, rel=0.05)  # s.e. 1 %


# --------------------------------------------------------------------------------------------
# Lengths: fixed, uniform, empirical
# --------------------------------------------------------------------------------------------


def test_fixed_lengths(rng):
    config = WorkloadConfig(lengths="fixed", prompt_tokens=300, output_tokens=40)
    gen = WorkloadGenerator(config, 4096)
    workload = gen.sample(100, rng)
    assert np.all(workload.prompt_tokens == 300) and np.all(workload.output_tokens == 40)
    assert gen.mean_prompt_tokens == 300 and gen.mean_output_tokens == 40


def test_uniform_lengths_are_inclusive_ranges(rng):
    config = WorkloadConfig(lengths="uniform", prompt_tokens_range=(5, 9),
                            output_tokens_range=(1, 3))
    gen = WorkloadGenerator(config, 4096)
    workload = gen.sample(5000, rng)
    assert set(np.unique(workload.prompt_tokens)) == {5, 6, 7, 8, 9}
    assert set(np.unique(workload.output_tokens)) == {1, 2, 3}
    assert gen.mean_prompt_tokens == pytest.approx(7.0, rel=0.01)
    assert gen.mean_output_tokens == pytest.approx(2.0, rel=0.01)


def test_packaged_summaries_are_listed_and_have_provenance():
    assert {"splitwise_conv", "arxiv_summarization"} <= set(available_empirical())
    for name, rows in (("splitwise_conv", 19_366), ("arxiv_summarization", 28_257)):
        data = json.loads((DATA_DIR / f"{name}.json").read_text())
        provenance = data["provenance"]
        assert provenance["source_rows"] == rows
        assert provenance["source_commit"] == "7d47513363ec447a741ac5e47241580b47724fbf"
        assert provenance["source_file"].startswith("data/processed_traces/")
        for column in ("prompt_tokens", "output_tokens"):
            assert set(data["stats"][column]) >= {"count", "mean", "p50", "p90", "p99", "max"}
    arrivals = json.loads((DATA_DIR / "splitwise_conv.json").read_text())["stats"]["arrivals"]
    assert arrivals["mean_qps"] == pytest.approx(5.53, abs=0.01)
    assert arrivals["interarrival_cv"] == pytest.approx(1.094, abs=0.01)


def test_unknown_empirical_name_lists_available():
    with pytest.raises(ValueError, match="splitwise_conv") as info:
        WorkloadGenerator(WorkloadConfig(lengths="empirical", empirical="sharegpt"), 4096)
    assert "sharegpt" in str(info.value) and "arxiv_summarization" in str(info.value)
    with pytest.raises(ValueError, match="unknown length summary"):
        load_empirical("../data/splitwise_conv")


@pytest.mark.parametrize("name", ["splitwise_conv", "arxiv_summarization"])
def test_empirical_samples_match_the_summary(rng, name):
    sampler = load_empirical(name)
    prompt, output = sampler.sample(200_000, rng)
    for column, values in (("prompt_tokens", prompt), ("output_tokens", output)):
        stats = sampler.stats[column]
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        assert p50 == pytest.approx(stats["p50"], rel=0.02)
        assert p90 == pytest.approx(stats["p90"], rel=0.02)
        assert p99 == pytest.approx(stats["p99"], rel=0.02)
        assert values.mean() == pytest.approx(stats["mean"], rel=0.02)
        assert values.min() >= 1 and values.max() <= stats["max"]
    rho = np.corrcoef(np.argsort(np.argsort(prompt)), np.argsort(np.argsort(output)))[0, 1]
    assert rho == pytest.approx(sampler.stats["spearman_prompt_output"], abs=0.03)


def test_empirical_mean_prior_matches_summary():
    gen = WorkloadGenerator(WorkloadConfig(lengths="empirical"), max_total_tokens=10**6)
    stats = gen.empirical.stats
    assert gen.mean_output_tokens == pytest.approx(stats["output_tokens"]["mean"], rel=0.01)
    assert gen.mean_prompt_tokens == pytest.approx(stats["prompt_tokens"]["mean"], rel=0.01)
    clipped = WorkloadGenerator(WorkloadConfig(lengths="empirical"), max_total_tokens=2048)
    assert clipped.mean_prompt_tokens < gen.mean_prompt_tokens


@pytest.mark.shared_data
@pytest.mark.parametrize("name, source", [("splitwise_conv", CONV), ("arxiv_summarization", ARXIV)])
def test_empirical_sampler_matches_the_real_trace(vidur_data, rng, name, source):
    with open(vidur_data / source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    real = {"prompt": np.array([int(r["num_prefill_tokens"]) for r in rows]),
            "output": np.array([int(r["num_decode_tokens"]) for r in rows])}
    prompt, output = load_empirical(name).sample(400_000, rng)
    sampled = {"prompt": prompt, "output": output}
    levels = [10, 25, 50, 75, 90, 99]
    for column in ("prompt", "output"):
        got, want = np.percentile(sampled[column], levels), np.percentile(real[column], levels)
        np.testing.assert_allclose(got, want, rtol=0.03, err_msg=f"{name} {column} quantiles")
        assert sampled[column].mean() == pytest.approx(real[column].mean(), rel=0.02)


# --------------------------------------------------------------------------------------------
# Trace replay
# --------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_load_real_trace(vidur_data):
    trace = load_trace(vidur_data / CONV)
    assert len(trace) == 19_366
    assert trace.arrival_times[0] == 0.0
    assert np.median(trace.prompt_tokens) == 1020 and trace.output_tokens.max() == 1000
    assert trace.mean_qps == pytest.approx(5.53, abs=0.01)


@pytest.mark.shared_data
def test_real_trace_rescaled_to_trace_qps(vidur_data, rng):
    path = str(vidur_data / CONV)
    gen = WorkloadGenerator(WorkloadConfig(arrival="trace", lengths="trace", trace_path=path,
                                           trace_qps=12.0, trace_start=0), 4096)
    whole = gen.sample(19_366, rng)
    assert mean_rate(whole.arrival_times) == pytest.approx(12.0, rel=1e-9)
    random_start = WorkloadGenerator(WorkloadConfig(arrival="trace", lengths="trace",
                                                    trace_path=path, trace_qps=12.0), 4096)
    rates = [mean_rate(random_start.sample(2000, rng).arrival_times) for _ in range(30)]
    assert np.mean(rates) == pytest.approx(12.0, rel=0.15)  # windows keep the trace's variation


def test_replay_in_order_shifted_to_zero(small_trace, rng):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace),
                            trace_start=1)
    workload = WorkloadGenerator(config, 4096).sample(3, rng)
    np.testing.assert_allclose(workload.arrival_times, [0.0, 1.5, 2.0])
    assert workload.prompt_tokens.tolist() == [20, 30, 40]
    assert workload.output_tokens.tolist() == [6, 7, 8]


def test_replay_wraps_around_with_span_plus_mean_gap(small_trace, rng):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace),
                            trace_start=3)
    workload = WorkloadGenerator(config, 4096).sample(12, rng)
    times = workload.arrival_times
    assert np.all(np.diff(times) > 0)
    # rows 3, 4 | 0..4 | 0..4: period = span 4 s + mean gap 1 s = 5 s
    np.testing.assert_allclose(times, [0.0, 1.5, 2.5, 3.0, 4.5, 5.0, 6.5,
                                       7.5, 8.0, 9.5, 10.0, 11.5])
    assert workload.prompt_tokens.tolist() == [40, 50, 10, 20, 30, 40, 50, 10, 20, 30, 40, 50]


def test_replay_rescale_gives_trace_qps(small_trace, rng):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace),
                            trace_start=0, trace_qps=4.0)
    times = WorkloadGenerator(config, 4096).sample(5, rng).arrival_times
    assert mean_rate(times) == pytest.approx(4.0)
    np.testing.assert_allclose(times, [0.0, 0.125, 0.5, 0.625, 1.0])
    many = WorkloadGenerator(config, 4096).sample(5 * 7, rng).arrival_times
    assert mean_rate(many) == pytest.approx(4.0)  # exact across wrap-arounds


def test_random_start_uses_rng(small_trace):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace))
    gen = WorkloadGenerator(config, 4096)
    firsts = {int(gen.sample(1, np.random.default_rng(seed)).prompt_tokens[0])
              for seed in range(40)}
    assert firsts == {10, 20, 30, 40, 50}


def test_trace_lengths_with_synthetic_arrivals_sample_rows(small_trace, rng):
    config = WorkloadConfig(arrival="poisson", lengths="trace", trace_path=str(small_trace))
    gen = WorkloadGenerator(config, 4096)
    workload = gen.sample(2000, rng)
    pairs = set(zip(workload.prompt_tokens.tolist(), workload.output_tokens.tolist(), strict=True))
    assert pairs == {(10, 5), (20, 6), (30, 7), (40, 8), (50, 9)}
    assert gen.mean_prompt_tokens == 30 and gen.mean_output_tokens == 7


def test_replay_config_errors_at_construction(small_trace, tmp_path):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(small_trace),
                            trace_start=5)
    with pytest.raises(ValueError, match=r"trace_start=5.*5 rows"):
        WorkloadGenerator(config, 4096)
    flat = write_trace(tmp_path / "flat.csv", [(2.0, 10, 5), (2.0, 11, 5)])
    with pytest.raises(ValueError, match="two distinct arrival times"):
        WorkloadGenerator(WorkloadConfig(arrival="trace", lengths="trace",
                                         trace_path=str(flat)), 4096)
    with pytest.raises(TraceError, match="not found"):
        WorkloadGenerator(WorkloadConfig(lengths="trace",
                                         trace_path=str(tmp_path / "nope.csv")), 4096)
    with pytest.raises(ValueError, match="max_total_tokens"):
        WorkloadGenerator(WorkloadConfig(lengths="fixed"), 1)


# --------------------------------------------------------------------------------------------
# Oversize policies
# --------------------------------------------------------------------------------------------


def uniform_config(policy: str) -> WorkloadConfig:
    return WorkloadConfig(lengths="uniform", prompt_tokens_range=(100, 3000),
                          output_tokens_range=(10, 2000), oversize_policy=policy)


def test_clip_policy(rng):
    gen = WorkloadGenerator(uniform_config("clip"), max_total_tokens=2048)
    raw = WorkloadGenerator(uniform_config("clip"), max_total_tokens=10**6)
    state = rng.bit_generator.state
    workload = gen.sample(3000, rng)
    rng.bit_generator.state = state
    original = raw.sample(3000, rng)
    over = original.prompt_tokens + original.output_tokens > 2048
    assert workload.num_clipped == over.sum() > 0 and workload.num_rejected == 0
    assert len(workload) == 3000
    total = workload.prompt_tokens + workload.output_tokens
    assert total.max() <= 2048 and workload.prompt_tokens.min() >= 1
    # the excess comes off both lengths in proportion (each cut rounded up): within one
    # token of the cap, and the prompt/output ratio kept to within rounding
    assert ((total[over] >= 2047) & (total[over] <= 2048)).all()
    raw_total = (original.prompt_tokens + original.output_tokens)[over]
    excess = raw_total - 2048
    for kept, raw in ((workload.prompt_tokens, original.prompt_tokens),
                      (workload.output_tokens, original.output_tokens)):
        cut = (raw - kept)[over]
        share = excess * raw[over] / raw_total
        assert ((cut >= share) & (cut < share + 1)).all()  # share rounded up
    np.testing.assert_array_equal(workload.prompt_tokens[~over], original.prompt_tokens[~over])
    np.testing.assert_array_equal(workload.output_tokens[~over], original.output_tokens[~over])


def test_clip_removes_the_excess_proportionally(rng):
    config = WorkloadConfig(lengths="fixed", prompt_tokens=500, output_tokens=5000)
    gen = WorkloadGenerator(config, max_total_tokens=1000)
    workload = gen.sample(4, rng)
    # excess 4500: prompt loses ceil(4500 * 500 / 5500) = 410, output ceil(4500 * 5000 / 5500)
    # = 4091
    assert workload.prompt_tokens.tolist() == [90] * 4
    assert workload.output_tokens.tolist() == [909] * 4
    assert workload.num_clipped == 4
    assert gen.mean_output_tokens == 909 and gen.mean_prompt_tokens == 90


def test_clip_lengths_invariants():
    rng = np.random.default_rng(5)
    prompt = rng.integers(1, 20_000, 50_000)
    output = rng.integers(1, 20_000, 50_000)
    prompt[:5], output[:5] = [1, 19_999, 1, 2, 3], [19_999, 1, 1, 2, 19_000]
    for cap in (2, 3, 17, 4096):
        p, o = clip_lengths(prompt, output, cap)
        assert (p >= 1).all() and (o >= 1).all() and (p + o <= cap).all()
        kept = prompt + output <= cap
        np.testing.assert_array_equal(p[kept], prompt[kept])
        np.testing.assert_array_equal(o[kept], output[kept])
        assert (p <= prompt).all() and (o <= output).all()


def test_reject_policy(rng):
    gen = WorkloadGenerator(uniform_config("reject"), max_total_tokens=2048)
    workload = gen.sample(3000, rng)
    assert workload.num_rejected > 0 and workload.num_clipped == 0
    assert len(workload) + workload.num_rejected == 3000
    assert (workload.prompt_tokens + workload.output_tokens).max() <= 2048
    assert np.all(np.diff(workload.arrival_times) >= 0)
    assert gen.mean_output_tokens < (10 + 2000) / 2  # long outputs are rejected more often


def test_reject_everything_is_a_config_error():
    config = WorkloadConfig(lengths="fixed", prompt_tokens=3000, output_tokens=2000,
                            oversize_policy="reject")
    with pytest.raises(ValueError, match="every request exceeds"):
        WorkloadGenerator(config, max_total_tokens=4096)


def test_error_policy_names_the_request(rng):
    config = WorkloadConfig(lengths="fixed", prompt_tokens=3000, output_tokens=2000,
                            oversize_policy="error")
    gen = WorkloadGenerator(config, max_total_tokens=4096)
    with pytest.raises(ValueError, match=r"request 0\b.*prompt_tokens=3000.*output_tokens=2000"
                                         r".*5000.*max_total_tokens=4096"):
        gen.sample(10, rng)
    fine = WorkloadGenerator(uniform_config("error"), max_total_tokens=10**6)
    assert len(fine.sample(100, rng)) == 100


def test_error_policy_names_the_trace_line(tmp_path, rng):
    rows = [(0.0, 10, 5), (1.0, 20, 6), (2.0, 3000, 2000), (3.0, 40, 8)]
    path = write_trace(tmp_path / "big.csv", rows)
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(path),
                            trace_start=1, oversize_policy="error")
    with pytest.raises(ValueError, match=r"request 1 \(trace line 4 of .*big\.csv\).*"
                                         r"prompt_tokens=3000"):
        WorkloadGenerator(config, 4096).sample(3, rng)


# --------------------------------------------------------------------------------------------
# Trace validation
# --------------------------------------------------------------------------------------------


def assert_trace_error(path: Path, line: int | None, column: str | None, value: str | None,
                       *fragments: str) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message
    if column is not None:
        assert repr(column) in message
    if value is not None:
        assert repr(value) in message
    for fragment in fragments:
        assert fragment in message, message
    assert (info.value.line, info.value.column, info.value.value) == (line, column, value)
    return info.value


def test_missing_column_is_named_with_found_columns(tmp_path):
    path = write_trace(tmp_path / "t.csv", [(0.0, 5)], header="arrived_at,num_prefill_tokens")
    assert_trace_error(path, 1, None, None, "'num_decode_tokens'", "found columns",
                       "'arrived_at', 'num_prefill_tokens'")


def test_non_numeric_value(tmp_path):
    path = write_trace(tmp_path / "t.csv", [(0.0, 5, 3), (1.0, "abc", 3)])
    assert_trace_error(path, 3, "num_prefill_tokens", "abc", "not a number")


@pytest.mark.parametrize("bad", ["0", "-4"])
def test_non_positive_tokens(tmp_path, bad):
    path = write_trace(tmp_path / "t.csv", [(0.0, 5, 3), (1.0, 5, 3), (2.0, 5, bad)])
    assert_trace_error(path, 4, "num_decode_tokens", bad, ">= 1")


def test_fractional_tokens(tmp_path):
    path = write_trace(tmp_path / "t.csv", [(0.0, 5.5, 3)])
    assert_trace_error(path, 2, "num_prefill_tokens", "5.5", "whole number")
    ok = write_trace(tmp_path / "ok.csv", [(0.0, "5.0", 3)])
    assert load_trace(ok).prompt_tokens.tolist() == [5]


@pytest.mark.parametrize("column, row", [
    ("arrived_at", ("nan", 5, 3)),
    ("num_prefill_tokens", (0.0, "NaN", 3)),
    ("num_decode_tokens", (0.0, 5, "inf")),
])
def test_nan_and_inf(tmp_path, column, row):
    path = write_trace(tmp_path / "t.csv", [row])
    value = row[("arrived_at", "num_prefill_tokens", "num_decode_tokens").index(column)]
    assert_trace_error(path, 2, column, str(value), "finite")


def test_negative_arrival(tmp_path):
    path = write_trace(tmp_path / "t.csv", [(-1.5, 5, 3)])
    assert_trace_error(path, 2, "arrived_at", "-1.5", ">= 0")


def test_arrival_going_backwards_names_previous_value(tmp_path):
    path = write_trace(tmp_path / "t.csv", [(0.0, 5, 3), (4.25, 5, 3), (3.5, 5, 3)])
    assert_trace_error(path, 4, "arrived_at", "3.5", "backwards", "line 3", "4.25")


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_trace_error(empty, 1, None, None, "empty")
    header_only = write_trace(tmp_path / "header.csv", [])
    assert_trace_error(header_only, 1, None, None, "no data rows")


def test_missing_file_and_ragged_row(tmp_path):
    assert_trace_error(tmp_path / "absent.csv", None, None, None, "not found")
    path = write_trace(tmp_path / "t.csv", [(0.0, 5, 3), (1.0, 5)])
    assert_trace_error(path, 3, None, "1.0,5", "expected 3", "found 2")


def test_blank_lines_keep_true_line_numbers(tmp_path, rng):
    path = tmp_path / "t.csv"
    path.write_text("num_decode_tokens,arrived_at,num_prefill_tokens,extra\n"
                    "3,0.0,5,x\n\n7,1.0,9,y\n\n4,2.0,x,z\n")
    assert_trace_error(path, 6, "num_prefill_tokens", "x", "not a number")
    path.write_text("num_decode_tokens,arrived_at,num_prefill_tokens,extra\n"
                    "3,0.0,5,x\n\n7000,1.0,9,y\n")
    trace = load_trace(path)
    assert trace.prompt_tokens.tolist() == [5, 9] and trace.output_tokens.tolist() == [3, 7000]
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(path),
                            trace_start=0, oversize_policy="error")
    with pytest.raises(ValueError, match="trace line 4 "):
        WorkloadGenerator(config, 4096).sample(2, rng)


def test_lognormal_lengths_have_the_configured_medians_and_spread():
    config = WorkloadConfig(lengths="lognormal", prompt_lognormal=(2000.0, 0.8),
                            output_lognormal=(30.0, 0.5))
    gen = WorkloadGenerator(config, max_total_tokens=10**9)
    w = gen.sample(20_000, np.random.default_rng(0))
    assert np.median(w.prompt_tokens) == pytest.approx(2000, rel=0.03)
    assert np.median(w.output_tokens) == pytest.approx(30, rel=0.05)
    assert np.std(np.log(w.prompt_tokens)) == pytest.approx(0.8, rel=0.03)
    assert abs(np.corrcoef(np.log(w.prompt_tokens), np.log(w.output_tokens))[0, 1]) < 0.03
    assert w.prompt_tokens.min() >= 1 and w.output_tokens.min() >= 1


@pytest.mark.parametrize("field, value", [("prompt_lognormal", (0.5, 1.0)),
                                          ("output_lognormal", (100.0, -1.0))])
def test_lognormal_parameters_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        WorkloadConfig(lengths="lognormal", **{field: value})


def test_trace_rows_keep_every_window_inside_its_part_of_the_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    + "".join(f"{0.1 * i},{100 + i},{10}\n" for i in range(200)))
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(path),
                            trace_rows=(120, 200))
    gen = WorkloadGenerator(config, max_total_tokens=10**6)
    rng = np.random.default_rng(0)
    firsts = set()
    for _ in range(40):
        w = gen.sample(30, rng)
        first = int(w.prompt_tokens[0]) - 100
        assert 120 <= first <= 170 and np.all(np.diff(w.prompt_tokens) == 1)  # no wrap
        firsts.add(first)
    assert len(firsts) > 10
    with pytest.raises(ValueError, match=r"trace_rows=\(120, 200\): 80 rows .* 81 requests"):
        gen.sample(81, rng)
    with pytest.raises(ConfigError, match="trace_rows=.*conflicts with trace_start"):
        WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(path),
                       trace_rows=(0, 10), trace_start=3)
