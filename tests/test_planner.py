"""The rollout planner: whole-cluster copies that run exactly like the simulator, common random
numbers across candidates, its config errors, and its decisions."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import follow_base, planner

from llm_cluster_env.config import ConfigError
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.routing.lookahead import LookaheadRouter
from llm_cluster_env.routing.planner import (
    LengthSampler,
    PlanEstimate,
    PlannerConfig,
    RolloutPlannerRouter,
    fork_cluster,
)
from llm_cluster_env.tools.evaluation import run_episode


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("fields, message", [
    ({"horizon_s": 0.0}, "planner.horizon_s=0.0: must be"),
    ({"horizon_s": -2.0}, "planner.horizon_s=-2.0"),
    ({"horizon_s": float("nan")}, "planner.horizon_s=nan"),
    ({"samples": 0}, "planner.samples=0: must be an integer >= 1"),
    ({"samples": 2.5}, "planner.samples=2.5"),
    ({"candidates": 0}, "planner.candidates=0: must be an integer >= 1"),
    ({"base": "fastest"}, "planner.base='fastest': unknown router .known: round_robin"),
    ({"base": "lor"}, "planner.base='lor': the planner runs only least_added_time"),
    ({"assignment": "each"}, "planner.assignment='each'"),
    ({"lengths": "mean"}, "planner.lengths='mean'"),
    ({"clairvoyant": 1}, "planner.clairvoyant=1"),
    ({"clairvoyant_lengths": "no"}, "planner.clairvoyant_lengths='no'"),
    ({"switch_t": -1.0}, "planner.switch_t=-1.0"),
    ({"seed": -1}, "planner.seed=-1"),
])
def test_bad_config_names_the_key_and_value(fields, message):
    with pytest.raises(ConfigError, match=message):
        PlannerConfig(**fields)


def test_config_is_frozen():
    config = PlannerConfig()
    with pytest.raises(AttributeError):
        config.horizon_s = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------ exact copies
def test_clairvoyant_rollout_to_the_end_equals_the_realised_episode():
    """True future, every later arrival re-routed by least_added_time in each branch, horizon
    past the episode end: the estimated cost differences are the realised differences of the
    total E2E when the env takes each candidate and then least_added_time."""
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=160)
    seed, d = 3, 90
    actions, _ = follow_base(env, seed, d)
    est = planner(env, horizon_s=1e6, candidates=4, clairvoyant=True,
                  assignment="reroute").estimate(env.view)
    assert est.costs.shape == (1, 4)
    realised = []
    for c in est.candidates:
        follow_base(env, seed, d, actions)
        _, _, done, _, info = env.step(c)
        base = make_router("least_added_time")
        base.reset(env.num_replicas, np.random.default_rng(0))
        while not done:
            _, _, done, _, info = env.step(base.select(env.view))
        realised.append(info["requests"]["e2e_s"].sum())
    realised = np.array(realised) - realised[0]
    estimated = est.costs[0] - est.costs[0, 0]
    assert np.ptp(realised) > 0.5  # the choice matters here
    np.testing.assert_allclose(estimated, realised, atol=1e-6)


def test_with_no_arrival_in_the_horizon_the_planner_is_the_oracle_lookahead():
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=300)
    follow_base(env, 1, 200)
    est = planner(env, horizon_s=1e-9, candidates=4, clairvoyant=True).estimate(env.view)
    look = LookaheadRouter(oracle=True).costs(env.view)
    cands = list(est.candidates)
    np.testing.assert_allclose(est.costs[0] - est.costs[0, 0], look[cands] - look[cands[0]],
                               atol=1e-6)


def test_expected_lengths_and_no_arrival_in_the_horizon_is_the_lookahead():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=300)
    follow_base(env, 4, 150)
    est = planner(env, horizon_s=1e-9, candidates=4, samples=2,
                  lengths="expected").estimate(env.view)
    look = LookaheadRouter().costs(env.view)
    cands = list(est.candidates)
    for costs in est.costs:  # no randomness left: every future is the same
        np.testing.assert_allclose(costs - costs[0], look[cands] - look[cands[0]], atol=1e-6)


def test_true_arrivals_with_expected_lengths_and_no_arrival_is_the_lookahead():
    """The arrivals half of the clairvoyant bound: with no arrival in the horizon it is
    ``lookahead`` with its expected lengths (not the oracle's), one future."""
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=300)
    follow_base(env, 2, 150)
    router = planner(env, horizon_s=1e-9, candidates=4, samples=3, clairvoyant=True,
                     clairvoyant_lengths=False, lengths="expected")
    assert router.futures_per_decision() == 1
    est = router.estimate(env.view)
    look = LookaheadRouter().costs(env.view)
    oracle = LookaheadRouter(oracle=True).costs(env.view)
    cands = list(est.candidates)
    np.testing.assert_allclose(est.costs[0] - est.costs[0, 0], look[cands] - look[cands[0]],
                               atol=1e-6)
    assert not np.allclose(oracle[cands] - oracle[cands[0]], look[cands] - look[cands[0]])


def test_true_arrivals_keep_their_times_and_prompts_and_estimate_their_outputs():
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=300)
    follow_base(env, 5, 120)
    expected = planner(env, horizon_s=2.0, clairvoyant=True, clairvoyant_lengths=False,
                       lengths="expected")
    sampled = planner(env, horizon_s=2.0, clairvoyant=True, clairvoyant_lengths=False,
                      samples=3)
    assert sampled.futures_per_decision() == 3
    context = expected.context(env.view)
    truth = expected.true_arrivals(context.request, context.now)
    assert len(truth) >= 5
    _, _, pending, arrivals = expected._future(context, 0)
    assert [(a.id, a.arrival_time, a.prompt_tokens) for a in arrivals] == \
        [(a.id, a.arrival_time, a.prompt_tokens) for a in truth]
    from llm_cluster_env.routing.lookahead import expected_length
    prior = context.output_prior
    assert [a.output_tokens for a in arrivals] == [expected_length(prior, a, 0) for a in truth]
    assert pending.output_tokens == expected_length(prior, context.request, 0)
    drawn = [[a.output_tokens for a in sampled._future(context, k)[3]] for k in range(3)]
    assert len({tuple(d) for d in drawn}) > 1  # each future draws its own lengths
    assert [len(d) for d in drawn] == [len(truth)] * 3
    costs = sampled.estimate(env.view).costs
    assert costs.shape == (3, 2) and np.all(np.isfinite(costs))


def test_fork_leaves_the_simulators_replicas_untouched():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=200)
    follow_base(env, 0, 120)
    replicas = env.cluster.replicas
    before = [(r.version, len(r.waiting), len(r.running), r.clock, r.busy) for r in replicas]
    fork = fork_cluster(replicas, env.cluster.now, [])
    fork.dispatch(env.pending_request.clone(), 0)
    fork.drain()
    assert fork.in_system == 0 and len(fork.finished) == env.cluster.in_system + 1
    assert [(r.version, len(r.waiting), len(r.running), r.clock, r.busy)
            for r in replicas] == before


# ------------------------------------------------------------------ sampled futures
def test_futures_are_common_to_candidates_and_reproducible():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=200)
    follow_base(env, 2, 100)
    first = planner(env, samples=3, candidates=3).estimate(env.view)
    again = planner(env, samples=3, candidates=3).estimate(env.view)
    np.testing.assert_array_equal(first.costs, again.costs)
    other = planner(env, samples=3, candidates=3, seed=1).estimate(env.view)
    assert not np.array_equal(first.costs, other.costs)
    # the base's own branch routes live under both assignments: the same future, the same cost
    rerouted = planner(env, samples=3, candidates=3, assignment="reroute").estimate(env.view)
    np.testing.assert_array_equal(first.costs[:, 0], rerouted.costs[:, 0])
    assert not np.array_equal(first.costs[:, 1:], rerouted.costs[:, 1:])


def test_cross_assignment_averages_own_and_replayed_assignments():
    """With two candidates: shared = [own 0, candidate 1 on assignment 0], reroute = [own 0,
    own 1], cross = [(own 0 + candidate 0 on assignment 1) / 2, (own 1 + candidate 1 on
    assignment 0) / 2]."""
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=200)
    follow_base(env, 5, 120)
    costs = {mode: planner(env, samples=2, assignment=mode).estimate(env.view).costs
             for mode in ("shared", "reroute", "cross")}
    np.testing.assert_allclose(2 * costs["cross"][:, 1] - costs["reroute"][:, 1],
                               costs["shared"][:, 1], rtol=1e-12)


def test_sampled_arrivals_fall_in_the_horizon_at_the_workload_rate(rng):
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=50)
    router = planner(env, horizon_s=5.0)
    counts = []
    for _ in range(200):
        arrivals = router.sample_arrivals(10.0, rng)
        times = [a.arrival_time for a in arrivals]
        assert times == sorted(times) and all(10.0 < t <= 15.0 for t in times)
        counts.append(len(arrivals))
    # Poisson at 22.4 req/s over 5 s: mean 112, sd of the mean of 200 counts ~0.75
    assert np.mean(counts) == pytest.approx(22.4 * 5.0, abs=3.0)


def test_length_sampler_draws_from_the_tail_beyond_what_was_generated(rng):
    outputs = np.array([1, 5, 10, 50, 200, 400])
    sampler = LengthSampler(outputs)
    draws = [sampler.total(10, rng) for _ in range(3000)]
    assert set(draws) == {50, 200, 400}
    assert np.mean(draws) == pytest.approx((50 + 200 + 400) / 3, rel=0.05)
    assert sampler.total(400, rng) == 401  # nothing longer sampled: one more token


def test_shared_assignment_estimate_is_less_noisy_than_rerouting():
    """Spread of the per-future difference between the two best candidates over a few fixed
    decisions: sharing the base's assignment of the sampled arrivals cuts it."""
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=200)
    spread = {"shared": [], "reroute": []}
    for seed, d in ((0, 60), (1, 100), (2, 140)):
        follow_base(env, seed, d)
        for assignment in spread:
            est = planner(env, samples=6, horizon_s=3.0, assignment=assignment).estimate(env.view)
            spread[assignment].append(np.std(est.costs[:, 1] - est.costs[:, 0]))
    assert np.mean(spread["shared"]) < 0.7 * np.mean(spread["reroute"])


# ------------------------------------------------------------------ decisions
def test_switching_needs_a_saving_of_switch_t_standard_errors():
    costs = np.array([[10.0, 9.0, 9.5], [10.0, 11.0, 9.3], [10.0, 8.0, 9.2]])
    est = PlanEstimate((2, 0, 1), costs, np.zeros(3))
    # savings vs the base's choice: candidate 0 mean 0.67 (sd 1.53), candidate 1 0.67 (sd 0.15)
    assert est.choice == 0  # least mean cost (the first of two equal means)
    assert est.choose(2.0) == 1  # only candidate 1's saving is 7.7 standard errors
    assert est.choose(10.0) == 2  # neither: stay with the base's choice
    worse = PlanEstimate((1, 3), np.array([[1.0, 2.0], [1.0, 3.0]]), np.zeros(4))
    assert worse.choose(0.0) == 1


def test_one_candidate_is_least_added_time():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=120)
    metrics, _ = run_episode(env, planner(env, candidates=1), seed=5)
    base, _ = run_episode(env, make_router("least_added_time"), seed=5)
    assert metrics["e2e_mean"] == base["e2e_mean"]


def test_planner_episode_finishes_every_request_and_is_deterministic():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=60)
    first, lat = run_episode(env, planner(env, samples=2, horizon_s=1.0), seed=7)
    again, _ = run_episode(env, planner(env, samples=2, horizon_s=1.0), seed=7)
    assert len(lat.e2e) == 60 and np.all(lat.e2e > 0)
    assert first["e2e_mean"] == again["e2e_mean"]


def test_missing_workload_or_episode_is_a_clear_error():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=60)
    env.reset(seed=0)
    router = RolloutPlannerRouter(PlannerConfig())
    router.reset(env.num_replicas, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no workload model .* bind"):
        router.select(env.view)
    clairvoyant = RolloutPlannerRouter(PlannerConfig(clairvoyant=True))
    clairvoyant.reset(env.num_replicas, np.random.default_rng(0))
    with pytest.raises(ValueError, match="clairvoyant=True needs the episode"):
        clairvoyant.select(env.view)


def test_benchmark_smoke_run_prints_paired_table_and_noise(tmp_path, capsys):
    """benchmarks/planner.py end to end with a tiny budget."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("benchmark_planner", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "planner.json"
    args = bench.parse_args(["--scenarios", "heterogeneous", "--seeds", "2", "--requests", "40",
                             "--samples", "1", "--horizon-s", "1", "--noise-every", "15",
                             "--noise-samples", "2", "--noise-horizons", "1", "100",
                             "--out", str(out)])
    results = bench.main(args)
    printed = capsys.readouterr().out
    e2e = results["e2e"]["heterogeneous"]
    assert set(e2e) == {"least_added_time", "lookahead", "rollout_planner", "planner_clairvoyant"}
    assert all(len(r["e2e"]) == 2 and r["decision_ms"] > 0 for r in e2e.values())
    assert "| heterogeneous | rollout_planner |" in printed
    noise = results["noise"]["heterogeneous"]
    assert noise["shared/sampled"]["decisions"] == 4  # decisions 15 and 30 of 2 seeds
    # past the episode's end the clairvoyant re-routing estimate is the realised difference
    exact = noise["clairvoyant/reroute@100s"]
    assert all(abs(r["est_mean"] - r["realised"]) < 1e-6 for r in exact["rows"])
    assert json.loads(out.read_text())["args"]["seeds"] == 2


def test_the_planner_is_named_by_the_tools_but_not_run_by_all():
    from llm_cluster_env.routing.heuristics import ROUTERS
    from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
    from llm_cluster_env.tools import compare

    assert "rollout_planner" in ALL_ROUTERS and "rollout_planner" not in ROUTERS
    assert type(make_any_router("rollout_planner")).__name__ == "RolloutPlannerRouter"
    with pytest.raises(ValueError, match="router='nope': unknown router"):
        make_any_router("nope")
    args = compare.parse_args(["--routers", "lor,rollout_planner"])
    assert args.router_names == ["lor", "rollout_planner"]
    assert "rollout_planner" not in compare.parse_args(["--routers", "all"]).router_names
