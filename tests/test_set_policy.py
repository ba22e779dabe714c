"""The replica-set policies: equivariance, any replica count, masks, scaling, PPO and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from sb3_warmstart.policies.replica_set import (
    MASKED_LOGIT,
    RecurrentReplicaSetPolicy,
    ReplicaSetPolicy,
    SchemaMismatch,
    policy_for_spaces,
)

pytestmark = pytest.mark.train


def env_and_obs(num_replicas=4, slots=None, steps=300, seed=0):
    """A conversation cluster of ``num_replicas`` A100s at ~70% load and ``steps`` of its
    observations under ``lor``."""
    observation = {"replica_slots": slots} if slots else {}
    env = LLMClusterEnv(scenario="a100x4_conv_70", num_replicas=num_replicas,
                        episode_requests=steps + 1, observation=observation,
                        workload={"qps": 3.4 * num_replicas})
    obs, _ = env.reset(seed=seed)
    router = make_router("lor")
    router.reset(num_replicas, np.random.default_rng(seed))
    rows = [obs]
    for _ in range(steps - 1):
        obs, *_ = env.step(router.select(env.view))
        rows.append(obs)
    return env, np.array(rows)


def make_policy(env, cls=ReplicaSetPolicy, **kw):
    layout = env.layout
    return cls(env.observation_space, env.action_space, lambda _: 3e-4,
               replica_features=layout.replica_features,
               tail_features=layout.names[layout.replica_block:], **kw)


def probs(policy, obs, state=None):
    obs_t = th.as_tensor(obs, dtype=th.float32)
    with th.no_grad():
        if isinstance(policy, RecurrentReplicaSetPolicy):
            n = obs_t.shape[0]
            shape = (policy.lstm_actor.num_layers, n, policy.lstm_actor.hidden_size)
            state = state or (th.zeros(shape), th.zeros(shape))
            dist, _ = policy.get_distribution(obs_t, state, th.zeros(n))
        else:
            dist = policy.get_distribution(obs_t)
    return dist.distribution.probs.numpy()


def permute_replicas(obs, perm, per):
    out = obs.copy()
    n = len(perm)
    block = obs[:, : n * per].reshape(len(obs), n, per)
    out[:, : n * per] = block[:, perm].reshape(len(obs), n * per)
    return out


@pytest.mark.parametrize("cls", [ReplicaSetPolicy, RecurrentReplicaSetPolicy])
def test_permuting_replicas_permutes_the_action_probabilities(cls):
    env, obs = env_and_obs()
    policy = make_policy(env, cls)
    policy.fit_feature_scaling(obs)
    perm = np.array([2, 0, 3, 1])
    per = env.layout.num_replica_features
    p = probs(policy, obs[100:140])
    q = probs(policy, permute_replicas(obs[100:140], perm, per))
    np.testing.assert_allclose(q, p[:, perm], rtol=1e-5, atol=1e-7)
    assert p.std(axis=1).max() > 1e-4  # not trivially uniform


@pytest.mark.parametrize("cls", [ReplicaSetPolicy, RecurrentReplicaSetPolicy])
def test_one_policy_routes_any_number_of_replicas(cls):
    env4, obs4 = env_and_obs(4)
    policy = make_policy(env4, cls)
    policy.fit_feature_scaling(obs4)
    for n in (2, 8, 16, 64):
        env, obs = env_and_obs(n, steps=40)
        other = policy_for_spaces(policy, env.observation_space, env.action_space)
        p = probs(other, obs)
        assert p.shape == (40, n) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    # the same weights: identical decisions on the 4-replica observations
    again = policy_for_spaces(policy, env4.observation_space, env4.action_space)
    np.testing.assert_allclose(probs(again, obs4[:50]), probs(policy, obs4[:50]), rtol=1e-6)


def test_padded_slots_get_no_probability_and_change_nothing_else():
    env4, obs4 = env_and_obs(4)
    padded, obs_padded = env_and_obs(4, slots=16)
    policy = make_policy(padded)
    policy.fit_feature_scaling(obs_padded)
    p = probs(policy, obs_padded[:60])
    assert np.all(p[:, 4:] == 0.0)
    plain = policy_for_spaces(policy, env4.observation_space, env4.action_space)
    np.testing.assert_allclose(probs(plain, obs4[:60]), p[:, :4], rtol=1e-5, atol=1e-7)
    policy.uniform_actions = True
    np.testing.assert_allclose(probs(policy, obs_padded[:5]), np.tile([0.25] * 4 + [0] * 12,
                                                                      (5, 1)))
    with th.no_grad():
        logits = policy.mlp_extractor.forward_actor(
            policy.extract_features(th.as_tensor(obs_padded[:2]), policy.features_extractor))
    assert th.all(logits[:, 4:] == MASKED_LOGIT)


def test_scaling_is_shared_by_replicas_and_rarely_clips():
    env, obs = env_and_obs(8, steps=600)
    policy = make_policy(env)
    shares = policy.fit_feature_scaling(obs)
    assert shares["decisions_at_clip"] < 0.01
    extractor = policy.features_extractor
    assert extractor.replica_mean.shape == (env.layout.num_replica_features,)


def test_a_different_feature_schema_is_refused_naming_the_feature():
    env, obs = env_and_obs(4)
    policy = make_policy(env)
    no_engine = LLMClusterEnv(scenario="a100x4_conv_70", observation={"engine_signals": False})
    layout = no_engine.layout
    with pytest.raises(SchemaMismatch, match="per-replica feature 8: the policy was trained "
                                             "with 'est_wait_s', the cluster's observation has "
                                             "'none'"):
        policy.check_schema(layout.replica_features, layout.names[layout.replica_block:])


@pytest.mark.parametrize("algo", ["ppo", "recurrent"])
def test_kl_ppo_trains_saves_and_loads_a_set_policy(tmp_path, algo):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO
    from sb3_warmstart.pipeline.config import KLConfig

    def make():
        return LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=64,
                             observation={"replica_slots": 8})

    venv = DummyVecEnv([make, make])
    layout = venv.envs[0].layout
    kwargs = dict(replica_features=list(layout.replica_features),
                  tail_features=list(layout.names[layout.replica_block:]))
    cls, policy = (KLPPO, ReplicaSetPolicy) if algo == "ppo" else (KLRecurrentPPO,
                                                                   RecurrentReplicaSetPolicy)
    extra = {} if algo == "ppo" else {"lstm_hidden_size": 16}
    model = cls(policy, venv, n_steps=32, batch_size=32, n_epochs=2, seed=0, device="cpu",
                policy_kwargs={**kwargs, **extra},
                kl=KLConfig(kl_ref_coef_initial=0.5, kl_coef=0.1))
    model.set_reference_policy(model.policy)
    model.learn(128)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = cls.load(path, env=venv, device="cpu")
    obs = venv.reset()
    if algo == "ppo":
        a, _ = model.predict(obs, deterministic=True)
        b, _ = loaded.predict(obs, deterministic=True)
    else:
        starts = np.ones(2, dtype=bool)
        a, _ = model.predict(obs, state=None, episode_start=starts, deterministic=True)
        b, _ = loaded.predict(obs, state=None, episode_start=starts, deterministic=True)
    np.testing.assert_array_equal(a, b)
    assert np.all(a < 4)  # only the 4 replicas present
    assert loaded.num_minibatch_steps == model.num_minibatch_steps > 0


def test_box_space_mismatch_is_refused():
    with pytest.raises(SchemaMismatch, match="not slots x 11"):
        ReplicaSetPolicy(spaces.Box(0, 1, (40,)), spaces.Discrete(3), lambda _: 1e-3,
                         replica_features=["queued"] * 10 + ["speed_k"], tail_features=["a"] * 6)
