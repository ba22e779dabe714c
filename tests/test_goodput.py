"""SLO goodput in the episode metrics, the goodput reward term, and refused SLO targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_cluster_env.config import ConfigError, EnvConfig, RewardConfig, SLOConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.sim.metrics import RequestLatencies, episode_metrics
from llm_cluster_env.sim.request import Request, RequestState

SMALL = dict(scenario="a100x4_conv_70", episode_requests=150)


def finished(request_id: int, arrival: float, first: float, finish: float, output: int) -> Request:
    req = Request(request_id, arrival, 100, output)
    req.state = RequestState.FINISHED
    req.replica_id = 0
    req.first_scheduled_time = arrival
    req.first_token_time = first
    req.finish_time = finish
    return req


def test_goodput_counts_requests_meeting_both_targets_over_the_span():
    # targets: TTFT <= 1.0 s, TPOT <= 0.25 s per token after the first (binary-exact numbers)
    requests = [
        finished(0, 0.0, 1.0, 3.0, 9),    # TTFT 1.0 (== target), TPOT 0.25 (== target): meets
        finished(1, 1.0, 1.5, 1.5, 1),    # one-token output, TTFT 0.5: meets (no TPOT)
        finished(2, 2.0, 3.5, 4.0, 3),    # TTFT 1.5: misses
        finished(3, 3.0, 3.5, 8.0, 10),   # TPOT 0.5: misses
        finished(4, 4.0, 4.25, 5.25, 5),  # TTFT 0.25, TPOT 0.25: meets
    ]
    lat = RequestLatencies.from_requests(requests)
    span = 8.0 - 0.0  # first arrival (0.0) to last completion (8.0)
    m = episode_metrics(lat, dispatch_counts=[5], busy_time=[8.0], makespan_s=span,
                        ttft_slo_s=1.0, tpot_slo_s=0.25)
    assert m["goodput_rps"] == 3 / 8.0
    assert m["slo_attainment"] == 3 / 5
    assert m["throughput_rps"] == 5 / 8.0
    # a request just past the TTFT target no longer counts
    m = episode_metrics(lat, dispatch_counts=[5], busy_time=[8.0], makespan_s=span,
                        ttft_slo_s=np.nextafter(1.0, 0.0), tpot_slo_s=0.25)
    assert m["goodput_rps"] == 2 / 8.0


def test_goodput_of_an_empty_episode_is_zero():
    lat = RequestLatencies.from_requests([])
    m = episode_metrics(lat, dispatch_counts=[0, 0], busy_time=[0.0, 0.0], makespan_s=0.0,
                        ttft_slo_s=0.5, tpot_slo_s=0.05)
    assert m["goodput_rps"] == 0.0


@pytest.mark.parametrize("key", ["ttft_s", "tpot_s"])
@pytest.mark.parametrize("value", [0.0, -0.5, math.nan])
def test_slo_targets_not_above_zero_are_refused_naming_key_and_value(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}={value!r}: must be > 0"):
        SLOConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^slo\.{key}={value!r}: must be > 0"):
        EnvConfig.from_kwargs(scenario="a100x4_conv_70", slo={key: value})


@pytest.mark.parametrize("value", [-1.0, math.inf])
def test_goodput_weight_must_be_finite_and_non_negative(value):
    with pytest.raises(ConfigError, match=rf"^goodput_weight={value!r}"):
        RewardConfig(goodput_weight=value)


def test_goodput_weight_defaults_to_zero_in_the_config():
    assert RewardConfig().goodput_weight == 0.0


def run(env: LLMClusterEnv, seed: int, policy: str = "lor"):
    env.reset(seed=seed)
    router = make_router(policy)
    router.reset(env.num_replicas, np.random.default_rng(seed))
    rewards, done, info = [], False, {}
    while not done:
        _, reward, done, _, info = env.step(router.select(env.view))
        rewards.append(reward)
    return np.array(rewards), info


def met_slo(env: LLMClusterEnv) -> int:
    slo = env.config.slo
    return sum((r.first_token_time - r.arrival_time) <= slo.ttft_s and (
        r.output_tokens == 1
        or (r.finish_time - r.first_token_time) / (r.output_tokens - 1) <= slo.tpot_s)
        for r in env.cluster.requests)


def test_episode_goodput_metric_matches_requests_meeting_the_slo():
    env = LLMClusterEnv(**SMALL, slo={"ttft_s": 0.2, "tpot_s": 0.03})
    _, info = run(env, seed=3)
    m = info["metrics"]
    count = met_slo(env)
    assert 0 < count < len(env.cluster.requests)  # the targets bite: the case is not trivial
    first = min(r.arrival_time for r in env.cluster.requests)
    last = max(r.finish_time for r in env.cluster.requests)
    assert m["makespan_s"] == pytest.approx(last - first, rel=1e-12)
    assert m["goodput_rps"] == pytest.approx(count / (last - first), rel=1e-12)
    assert m["goodput_rps"] == pytest.approx(m["slo_attainment"] * m["throughput_rps"],
                                             rel=1e-12)


def test_goodput_reward_sums_to_weight_times_requests_meeting_the_slo():
    weight, scale = 2.5, 0.1
    env = LLMClusterEnv(**SMALL, slo={"ttft_s": 0.2, "tpot_s": 0.03},
                        reward={"goodput_weight": weight, "scale": scale})
    rewards, info = run(env, seed=3)
    m = info["metrics"]
    count = met_slo(env)
    assert 0 < count < len(env.cluster.requests)
    assert m["reward_goodput"] == pytest.approx(scale * weight * count, rel=1e-12)
    assert m["reward_goodput"] == pytest.approx(
        scale * weight * m["goodput_rps"] * m["makespan_s"], rel=1e-9)
    terms = sum(m[f"reward_{t}"] for t in ("latency", "ttft", "slo", "goodput", "imbalance"))
    assert rewards.sum() == pytest.approx(terms, rel=1e-9)
    # the same episode without the term: every step's reward differs by exactly the term
    plain = LLMClusterEnv(**SMALL, slo={"ttft_s": 0.2, "tpot_s": 0.03}, reward={"scale": scale})
    plain_rewards, plain_info = run(plain, seed=3)
    assert plain_info["metrics"]["reward_goodput"] == 0.0
    assert (rewards - plain_rewards).sum() == pytest.approx(scale * weight * count, rel=1e-9)
    assert np.all(rewards - plain_rewards >= -1e-12)
