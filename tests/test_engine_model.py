"""Engine-model signals: exact where the engine is simple, sane and predictive elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_env.config import ConfigError
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.engine_model import ENGINE_FEATURES, EngineModel, OutputLengthPrior
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import run_episode

SMALL = dict(scenario="a100x4_conv_70", episode_requests=400)


def test_output_prior_is_the_conditional_expectation_of_the_sample():
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, 4000, 50_000)
    output = np.where(prompt > 2000, 20, rng.integers(1, 400, prompt.size))
    prior = OutputLengthPrior(prompt, output)
    assert prior.mean_output == pytest.approx(output.mean())
    assert prior.expected_output(3500) == pytest.approx(20.0)
    assert prior.expected_output(100) == pytest.approx(output[prompt < 400].mean(), rel=0.05)
    for g in (0, 10, 150, 350):
        longer = output[output > g]
        assert prior.remaining(g) == pytest.approx(longer.mean() - g)
    assert prior.remaining(10**6) >= 1.0  # past every sampled length: at least one more token


def test_idle_replica_ttft_is_the_simulated_ttft_of_a_lone_request():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=1,
                        workload={"lengths": "fixed", "prompt_tokens": 1500, "output_tokens": 40})
    obs, _ = env.reset(seed=0)
    ttft_column = env.layout.names.index("r2/est_ttft_s")
    wait_column = env.layout.names.index("r2/est_wait_s")
    assert obs[wait_column] == 0.0
    _, _, _, _, info = env.step(2)
    assert float(obs[ttft_column]) == pytest.approx(info["requests"]["ttft_s"][0], rel=1e-6)


def test_signals_are_ordered_finite_and_zero_past_the_last_request():
    env = LLMClusterEnv(**SMALL)
    layout = env.layout
    obs, _ = env.reset(seed=1)
    router = make_router("lor")
    router.reset(4, np.random.default_rng(1))
    done = False
    while not done:
        v = env.view
        wait, ttft, delta = (v.column(f) for f in ENGINE_FEATURES)
        assert np.all(np.isfinite(v.replicas)) and np.all(wait >= 0)
        assert np.all(ttft > wait) and np.all(delta >= ttft)
        obs, _, done, _, _ = env.step(router.select(v))
    final = layout.view(obs)
    assert np.all(final.replicas[:, [layout.column[f] for f in ENGINE_FEATURES]] == 0)


def test_estimated_ttft_predicts_the_realised_ttft():
    """Across an episode at ~90% load the estimate at the chosen replica tracks what happened."""
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=1500)
    env.reset(seed=3)
    router = make_router("lor")
    router.reset(4, np.random.default_rng(3))
    estimates = []
    done = False
    while not done:
        v = env.view
        choice = router.select(v)
        estimates.append(v.column("est_ttft_s")[choice])
        _, _, done, _, info = env.step(choice)
    realised = info["requests"]["ttft_s"]
    assert np.corrcoef(np.log(estimates), np.log(realised))[0, 1] > 0.8
    assert np.median(np.array(estimates) / realised) == pytest.approx(1.0, abs=0.25)


def test_oracle_uses_true_output_lengths():
    base = LLMClusterEnv(**SMALL)
    oracle = LLMClusterEnv(**SMALL, observation={"output_length_oracle": True})
    engine = oracle.builder.groups[-1]
    assert isinstance(engine.model, EngineModel) and engine.model.oracle
    assert not base.builder.groups[-1].model.oracle
    obs_a, _ = base.reset(seed=2)
    obs_b, _ = oracle.reset(seed=2)
    for _ in range(60):
        obs_a, *_ = base.step(0)
        obs_b, *_ = oracle.step(0)
    delta = base.layout.column["est_delta_s"]
    assert not np.allclose(base.view.replicas[:, delta], oracle.view.replicas[:, delta])


def test_padded_slots_change_nothing_for_the_routers():
    plain = LLMClusterEnv(**SMALL)
    padded = LLMClusterEnv(**SMALL, observation={"replica_slots": 8})
    assert padded.observation_space.shape == (8 * plain.layout.num_replica_features + 2,)
    assert padded.action_space.n == 8
    for name in ("lor", "least_work_time", "round_robin", "power_of_two"):
        a, _ = run_episode(plain, make_router(name), seed=5)
        b, _ = run_episode(padded, make_router(name), seed=5)
        assert a == b, name
    obs, _ = padded.reset(seed=5)
    view = padded.layout.view(obs)  # a bare vector: the replicas present are still found
    assert view.num_replicas == 4 and np.all(obs[4 * padded.layout.num_replica_features:
                                                  8 * padded.layout.num_replica_features] == 0)
    # an empty slot is masked; acting on it anyway routes to slot % replicas (tests/test_action_masks.py)
    assert padded.action_masks().tolist() == [True] * 4 + [False] * 4
    _, _, _, _, info = padded.step(5)
    assert info["invalid_action"] is True


def test_fewer_slots_than_replicas_is_refused():
    with pytest.raises(ConfigError, match="observation.replica_slots=2"):
        LLMClusterEnv(**SMALL, observation={"replica_slots": 2})


def test_added_time_is_never_below_the_ttft_across_decode_segments():
    """The request's own decode and the co-runners' slow-down compare whole iteration times.
    Linear pieces of the attention table extrapolated over a long horizon (here ~3,000 decode
    iterations), or intercepts of two different pieces, once made ``est_delta_s`` negative
    (down to -126 s) while requests decode across several pieces."""
    for qps in (10.0, 4.0):
        env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=40,
                            workload={"lengths": "fixed", "prompt_tokens": 480,
                                      "output_tokens": 3000, "qps": qps})
        model = EngineModel(env.output_prior)
        env.reset(seed=0)
        for _ in range(39):
            replica = env.cluster.replicas[0]
            for prompt in range(1, 4000, 7):
                wait, ttft, delta = model.estimate(replica, env.cluster.now, prompt)
                assert 0.0 <= wait < ttft <= delta, (qps, prompt, wait, ttft, delta)
            env.step(0)
        assert env.cluster.replicas[0].num_decoding >= 4
