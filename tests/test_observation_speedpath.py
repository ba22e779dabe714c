"""The fast observation path (features computed only when read, per-replica terms kept between
decisions, engine signals for all replicas at once) gives the values of the one-replica-at-a-
time reference, and routers get exactly the features they declare."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from llm_cluster_env.config import EnvConfig
from llm_cluster_env.env import observation
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import ScenarioSampler, load_family
from llm_cluster_env.env.observation import (
    REPLICA_FEATURES,
    SCALAR_MAX_REPLICAS,
    EngineFeatures,
    PrefixFeatures,
    optional_replica_features,
)
from llm_cluster_env.routing.base import Router
from llm_cluster_env.routing.engine_model import ScalarIterationTime, clock_and_boundary
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, make_router
from llm_cluster_env.sim.latency import IterationTimeModel
from llm_cluster_env.tools.evaluation import evaluate_routers, run_episode


def reference_block(env: LLMClusterEnv) -> np.ndarray:
    """The per-replica block of the current observation, replica by replica, as the builder
    computed it before the fast path (a loop over every replica and, for the engine signals,
    over every running request: :meth:`EngineModel.estimate`)."""
    builder = env.builder
    request = env.pending_request
    now = env.cluster.now
    groups = {type(g): g for g in builder.groups}
    prefix, engine = groups.get(PrefixFeatures), groups.get(EngineFeatures)
    share_den = max(len(builder._recent), 1)
    rows = []
    for rep in env.cluster.replicas:
        clock, tau0 = clock_and_boundary(rep, now)
        used = rep.blocks_in_use(clock)
        queued, running = len(rep.waiting), len(rep.running)
        generated = rep.generated_tokens_active(clock)
        if builder.oracle:
            decode = rep.active_output_tokens - generated
        else:
            decode = max((queued + running) * builder.mean_output_tokens - generated, 0.0)
        row = [queued, running, used / rep.num_blocks, rep.pending_prefill_tokens * 0.001,
               decode * 0.001, builder.recent_counts[rep.id] / share_den,
               builder._speed_k[rep.id], builder._capacity_k[rep.id]]
        if prefix is not None:  # unchanged code; its values of this decision
            row += [math.nan] * len(PrefixFeatures.names)
        if engine is not None:
            if request is None:
                row += [0.0, 0.0, 0.0]
            else:
                prompt = request.prompt_tokens
                cached = int(prefix.last_hits[rep.id] * prompt) if prefix is not None else 0
                row += list(engine.model.estimate(rep, now, prompt, request.output_tokens,
                                                  cached, timing=(clock, tau0)))
        rows.append(row)
    return np.array(rows, dtype=np.float64).astype(np.float32)


def family_configs(count: int) -> list[EnvConfig]:
    sampler = ScenarioSampler(load_family("generalist"))
    rng = np.random.default_rng(7)
    return [sampler.sample(rng)[0] for _ in range(count)]


CASES = {
    "a100x4_conv_70": dict(scenario="a100x4_conv_70", episode_requests=500),
    "heterogeneous": dict(scenario="heterogeneous", episode_requests=500),
    "a100x16": dict(scenario="a100x16", episode_requests=500),
    "a100x4_vllm_v0": dict(scenario="a100x4_vllm_v0", episode_requests=500),
    "a100x4_mixed": dict(scenario="a100x4_conv_70", replica={"batching": "mixed"},
                         episode_requests=500),
    "multiturn_chat": dict(scenario="multiturn_chat", episode_requests=400),
    "a100x4_conv_70_x40": dict(scenario="a100x4_conv_70", num_replicas=40,
                               episode_requests=800, workload={"qps": 160.0}),
}


def _env(case, oracle: bool) -> LLMClusterEnv:
    if isinstance(case, EnvConfig):
        config = dataclasses.replace(
            case, episode_requests=400,
            observation=dataclasses.replace(case.observation, output_length_oracle=oracle))
        return LLMClusterEnv(config=config)
    kwargs = dict(CASES[case])
    return LLMClusterEnv(**kwargs, observation={"output_length_oracle": oracle})


def _assert_episode_matches_reference(env: LLMClusterEnv, seed: int) -> int:
    """Random routing over a whole episode; every observation's per-replica block equals the
    reference to 1e-9 relative (the prefix columns excepted: their code is unchanged)."""
    layout = env.layout
    known = [layout.column[f] for f in layout.replica_features
             if f not in PrefixFeatures.names]
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    steps = 0
    done = False
    while True:
        block = obs[: layout.num_replicas * layout.num_replica_features].reshape(
            layout.num_replicas, layout.num_replica_features)
        ref = reference_block(env)
        np.testing.assert_allclose(block[:, known], ref[:, known], rtol=1e-9, atol=0.0)
        if done:
            return steps
        obs, _, done, _, _ = env.step(int(rng.integers(env.num_replicas)))
        steps += 1


@pytest.fixture(params=["scalar", "arrays"])
def path(request, monkeypatch):
    """Both ways of computing the features, on every cluster size: replica by replica
    (few replicas) and all replicas at once (many)."""
    monkeypatch.setattr(observation, "SCALAR_MAX_REPLICAS",
                        10**9 if request.param == "scalar" else 0)
    return request.param


@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_observations_equal_the_per_replica_reference_over_whole_episodes(case, oracle, path):
    env = _env(case, oracle)
    assert (env.builder.groups[-1].arrays is not None) == (path == "arrays")
    assert _assert_episode_matches_reference(env, seed=11) == env.config.episode_requests


@pytest.mark.parametrize("oracle", [False, True])
def test_family_samples_equal_the_per_replica_reference(oracle, path):
    configs = family_configs(3)
    assert len({len(c.replica_configs) for c in configs}) > 1
    for i, config in enumerate(configs):
        _assert_episode_matches_reference(_env(config, oracle), seed=5 + i)


@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("case", ["heterogeneous", "a100x4_vllm_v0", "a100x4_mixed",
                                  "multiturn_chat"])
def test_replica_by_replica_estimates_are_bitwise_those_of_the_engine_model(case, oracle):
    """The few-replica path (:class:`EngineScalars`, terms kept between decisions) gives
    exactly the float64 values of :meth:`EngineModel.estimate` (the float32 observation could
    hide a last-bit difference), at every decision of a whole episode."""
    env = _env(case, oracle)
    engine = env.builder.groups[-1]
    assert engine.scalars is not None
    prefix = next((g for g in env.builder.groups if isinstance(g, PrefixFeatures)), None)
    columns = engine.columns
    checked = []

    def checking(now, request, clocks, used, boundaries):
        got = columns(now, request, clocks, used, boundaries)
        if request is not None:
            prompt = request.prompt_tokens
            for i, rep in enumerate(env.cluster.replicas):
                cached = int(prefix.last_hits[i] * prompt) if prefix is not None else 0
                assert tuple(got[i]) == engine.model.estimate(
                    rep, now, prompt, request.output_tokens, cached,
                    timing=clock_and_boundary(rep, now)), (i, now)
                checked.append(i)
        return got

    engine.columns = checking
    obs, _ = env.reset(seed=4)
    rng = np.random.default_rng(4)
    done = False
    while not done:
        obs, _, done, _, _ = env.step(int(rng.integers(env.num_replicas)))
    assert len(checked) == env.config.episode_requests * env.num_replicas


@pytest.mark.parametrize("granularity", [None, 256])
def test_the_replica_by_replica_iteration_times_are_the_models_bit_for_bit(granularity):
    latency = IterationTimeModel.for_replica("llama-2-7b", "a100", 1,
                                             decode_context_granularity=granularity)
    timing = ScalarIterationTime(latency)
    rng = np.random.default_rng(0)
    for _ in range(2_000):
        batch = int(rng.choice([rng.integers(1, 300), rng.integers(4_000, 5_000)]))
        context = batch * int(rng.integers(1, 8_000))
        chunk = int(rng.integers(1, 20_000))
        time = latency.iteration_time(batch, context)
        assert timing.decode(batch, context) == time
        assert timing.decode_and_attention(batch, context) == (
            time, latency.decode_attention_time(batch, context))
        attention = latency.decode_attention_time(batch, context)
        assert timing.chunk_base(batch, chunk) + attention == latency.iteration_time(
            batch, context, ((chunk, 0),))
        assert timing.chunk_base(0, chunk) == latency.iteration_time(0, 0, ((chunk, 0),))
        assert timing.chunks(batch)[chunk] == timing.chunk_base(batch, chunk)


def test_the_default_path_depends_on_the_cluster_size():
    small = LLMClusterEnv(scenario="a100x16", episode_requests=10)
    large = LLMClusterEnv(scenario="a100x4_conv_70", num_replicas=SCALAR_MAX_REPLICAS + 1,
                          episode_requests=10)
    assert small.builder.groups[-1].arrays is None
    assert large.builder.groups[-1].arrays is not None


def test_replicas_untouched_since_the_last_step_are_not_read_again():
    """At 256 replicas (80% load) only the replicas with an event or a clock tick since the
    previous decision are read again: a few per step, not all 256."""
    env = LLMClusterEnv(scenario="a100x4_conv_70", num_replicas=256, episode_requests=3000,
                        workload={"qps": 0.8 * 256 * 5.15})
    builder = env.builder
    counts = []
    stale = builder._stale

    def counting(now):
        out = stale(now)
        counts.append(len(out))
        return out

    builder._stale = counting
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(int(rng.integers(256)))
    steady = np.array(counts[1000:])  # after the warm-up every replica is busy
    assert steady.mean() < 0.1 * 256, steady.mean()
    assert counts[0] == 256  # the first decision reads every replica


def _full_episode(env: LLMClusterEnv, router, seed: int) -> tuple[dict, list[int]]:
    """run_episode without the feature plan: the whole observation for every decision."""
    env.observe_for(None)
    env.reset(seed=seed)
    router.reset(env.num_replicas, np.random.default_rng(seed + 7_919))
    decisions = []
    done = False
    info = {}
    while not done:
        choice = router.select(env.view)
        decisions.append(choice)
        _, _, done, _, info = env.step(choice)
    return info["metrics"], decisions


@pytest.mark.parametrize("name", sorted(n for n in ROUTERS if n != "lookahead"))
def test_routers_decide_the_same_on_the_features_they_declare(name):
    scenario = "multiturn_chat" if name in CACHE_AWARE_ROUTERS else "a100x4_conv_70"
    env = LLMClusterEnv(scenario=scenario, episode_requests=300)
    reduced, _ = run_episode(env, make_router(name), seed=3)
    full, _ = _full_episode(env, make_router(name), seed=3)
    assert reduced == full


def test_a_router_reading_nothing_gets_no_replica_features():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=20)
    env.observe_for(make_router("round_robin"))
    obs, _ = env.reset(seed=0)
    view = env.layout.view(obs)
    computed = {"speed_k", "kv_capacity_k"}  # static
    for feature in env.layout.replica_features:
        column = view.column(feature)
        assert np.all(np.isfinite(column)) == (feature in computed), feature
    env.observe_for(make_router("lor"))
    obs, *_ = env.step(0)
    view = env.layout.view(obs)
    assert np.all(np.isfinite(view.queued)) and np.all(np.isnan(view.column("est_delta_s")))
    env.observe_for(None)  # an agent: everything
    obs, *_ = env.step(1)
    assert np.all(np.isfinite(obs))


def test_a_router_reading_a_feature_the_env_lacks_is_refused_by_name():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=20,
                        observation={"engine_signals": False})
    with pytest.raises(ValueError, match="router 'least_added_time' reads the feature "
                                         "'est_delta_s'"):
        env.observe_for(make_router("least_added_time"))

    class PrefixReader(Router):
        name = "prefix_reader"
        reads = ("prefix_hit",)

        def select(self, view):
            return int(np.argmax(view.column("prefix_hit")))

    with pytest.raises(ValueError, match="router 'prefix_reader' reads the feature 'prefix_hit'"):
        LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=20).observe_for(PrefixReader())
    # the cache-aware routers read the prefix features only where the env has them
    env.observe_for(make_router("sglang_cache_aware"))
    with pytest.raises(ValueError, match="router 'least_added_time' reads the feature"):
        evaluate_routers(dict(scenario="a100x4_conv_70", episode_requests=20,
                              observation={"engine_signals": False}),
                         {"lor": lambda: make_router("lor"),
                          "least_added_time": lambda: make_router("least_added_time")},
                         seeds=[0], progress=pytest.fail)  # refused before any episode


@pytest.mark.parametrize("prefix_features", [None, True, False])
@pytest.mark.parametrize("engine_signals", [True, False])
@pytest.mark.parametrize("scenario", ["a100x4_conv_70", "multiturn_chat"])
def test_one_rule_says_which_optional_features_are_on(scenario, engine_signals, prefix_features):
    env = LLMClusterEnv(scenario=scenario, episode_requests=10,
                        observation={"engine_signals": engine_signals,
                                     "prefix_features": prefix_features})
    names = optional_replica_features(env.config.observation, env.caches_prefixes)
    assert env.layout.replica_features == REPLICA_FEATURES + names
    assert ("prefix_hit" in names) == (prefix_features if prefix_features is not None
                                       else scenario == "multiturn_chat")
    assert ("est_delta_s" in names) == engine_signals
