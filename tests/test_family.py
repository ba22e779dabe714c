"""Scenario families: validation, reproducible draws, fixed spaces, routers and pickling."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest

import llm_cluster_env
from llm_cluster_env.config import ConfigError, ReplicaConfig, WorkloadConfig
from llm_cluster_env.env.capacity import saturation_throughput
from llm_cluster_env.env.family import ScenarioFamilyEnv, available_families, load_family
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import run_episode

SMALL = dict(replicas=[2, 6], replica_slots=8, episode_requests=64, capacity_requests=200)


@pytest.mark.parametrize("override, message", [
    ({"load": [0.9, 0.3]}, "family.load=(0.9, 0.3): empty or inverted range"),
    ({"replicas": [4, 2]}, "family.replicas=(4, 2): empty or inverted range"),
    ({"replicas": [2, 32]}, "family.replica_slots=16: fewer slots than the largest cluster"),
    ({"lengths": []}, "family.lengths=(): needs at least one choice"),
    ({"lengths": [{"kind": "lognormal", "prompt_median": [800, 100]}]},
     "family.lengths[0].prompt_median=(800.0, 100.0): empty or inverted range"),
    ({"arrivals": [{"kind": "gamma", "cv": [3.0, 1.0]}]},
     "family.arrivals[0].cv=(3.0, 1.0): empty or inverted range"),
    ({"gpus": {"tpu": 1.0}}, "family.gpus='tpu': unknown GPU"),
    ({"gpus": {"a100": 1.0}, "mixed_gpus": 0.5}, "mixing needs at least two GPU types"),
    ({"nope": 1}, "family.nope: unknown key"),
])
def test_bad_family_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_family("generalist", override)
    assert message in str(err.value)


def test_unknown_family_lists_the_packaged_ones():
    assert "generalist" in available_families()
    with pytest.raises(ConfigError, match="family='nope': unknown family"):
        load_family("nope")


def test_draws_are_reproducible_and_spaces_fixed():
    env = gym.make(llm_cluster_env.FAMILY_ENV_ID, family="generalist", **SMALL)
    width = env.observation_space.shape[0]
    seen = []
    for seed in range(6):
        obs, info = env.reset(seed=seed)
        assert obs.shape == (width,) and env.action_space.n == 8
        seen.append(info["scenario"]["replicas"])
        again, info2 = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, again)
        assert info2["scenario"] == info["scenario"]
    assert len(set(seen)) > 1 and all(2 <= n <= 6 for n in seen)


def test_heuristics_route_any_drawn_cluster_and_only_its_replicas():
    env = ScenarioFamilyEnv("generalist", **SMALL)
    for seed in range(3):
        for name in ("lor", "least_work_time", "round_robin"):
            metrics, _ = run_episode(env, make_router(name), seed)
            assert metrics["num_requests"] == 64
            assert len(env.env.dispatch_counts) == env.num_replicas


def test_load_is_a_fraction_of_measured_capacity():
    env = ScenarioFamilyEnv("generalist", **{**SMALL, "load": [0.5, 0.5]})
    _, info = env.reset(seed=3)
    scenario = info["scenario"]
    assert scenario["qps"] == pytest.approx(0.5 * scenario["capacity_rps"], rel=1e-3)
    a100 = saturation_throughput(ReplicaConfig(gpu="a100"), WorkloadConfig(), requests=1500)
    h100 = saturation_throughput(ReplicaConfig(gpu="h100"), WorkloadConfig(), requests=1500)
    assert 4.5 < a100 < 6.0 and 1.8 < h100 / a100 < 2.4  # benchmarks/capacity.py: 5.15, 10.55


def test_family_env_pickles_mid_episode_and_continues_identically():
    env = ScenarioFamilyEnv("generalist", **SMALL)
    env.reset(seed=1)
    for _ in range(20):
        env.step(0)
    twin = pickle.loads(pickle.dumps(env))
    for _ in range(30):
        a = env.step(1)
        b = twin.step(1)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    assert twin.sampler.capacities == env.sampler.capacities


def test_shared_cache_forgets_its_oldest_entries():
    from llm_cluster_env.env.family import SharedCache

    cache = SharedCache(maxsize=3)
    for i in range(5):
        cache[i] = i
    assert list(cache) == [2, 3, 4]
