"""GRU cells for the recurrent policies: the modules, the recurrence, BC, the reference KL,
saving and loading, and the main job with ``ppo.recurrent_cell: gru``."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

th = pytest.importorskip("torch")
pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
from imitation.data.types import TrajectoryWithRew  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.type_aliases import RNNStates  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402
from torch import nn  # noqa: E402

import llm_cluster_env  # noqa: E402
from llm_cluster_env.routing.heuristics import make_router  # noqa: E402
from sb3_warmstart.algorithms.ppo import KLRecurrentPPO  # noqa: E402
from sb3_warmstart.pipeline.config import BCConfig, KLConfig, PPOConfig, load_config  # noqa: E402
from sb3_warmstart.pipeline.warm_start_stage import expected_architecture  # noqa: E402
from sb3_warmstart.policies.policy_file import (  # noqa: E402
    PretrainedMismatchError,
    load_pretrained,
    save_pretrained,
    validate_pretrained,
)
from sb3_warmstart.policies.recurrent import (  # noqa: E402
    TemperatureMlpGruPolicy,
    TemperatureMlpLstmPolicy,
    action_log_probs,
    process_sequence,
    recurrent_policy_class,
)
from sb3_warmstart.policies.replica_set import (  # noqa: E402
    RecurrentReplicaSetGruPolicy,
    RecurrentReplicaSetPolicy,
    policy_for_spaces,
)
from sb3_warmstart.warmstart.cloning import clone_demonstrations  # noqa: E402

pytestmark = pytest.mark.train

N_ENVS = 2
GRU_POLICIES = [TemperatureMlpGruPolicy, RecurrentReplicaSetGruPolicy]


def make_env(episode_requests: int = 20) -> DummyVecEnv:
    return DummyVecEnv([partial(gym.make, "LLMCluster-v0", episode_requests=episode_requests)]
                       * N_ENVS)


def policy_kwargs(policy, env) -> dict:
    if issubclass(policy, RecurrentReplicaSetPolicy):
        layout = env.envs[0].unwrapped.layout
        return dict(lstm_hidden_size=8, embed_dim=8, hidden_dim=8,
                    replica_features=list(layout.replica_features),
                    tail_features=list(layout.names[layout.replica_block:layout.history_offset]))
    return dict(lstm_hidden_size=8, net_arch=[8])


def model_of(policy, seed=0, sequence_length=8, **kw) -> KLRecurrentPPO:
    env = make_env()
    return KLRecurrentPPO(policy, env, n_steps=32, batch_size=16, n_epochs=2, seed=seed,
                          device="cpu", policy_kwargs=policy_kwargs(policy, env),
                          sequence_length=sequence_length, **kw)


def collect_lor(num_episodes: int, episode_requests: int):
    env = gym.make(llm_cluster_env.ENV_ID, episode_requests=episode_requests)
    router = make_router("lor")
    trajectories = []
    for seed in range(num_episodes):
        obs, _ = env.reset(seed=seed)
        router.reset(env.unwrapped.num_replicas, np.random.default_rng(seed))
        observations, actions, rewards, done = [obs], [], [], False
        while not done:
            action = router.select(env.unwrapped.view)
            obs, reward, done, _, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
        trajectories.append(TrajectoryWithRew(
            obs=np.asarray(observations), acts=np.asarray(actions), infos=None, terminal=True,
            rews=np.asarray(rewards, dtype=np.float32)))
    return env, trajectories


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("policy", GRU_POLICIES)
def test_gru_policies_replace_every_lstm_and_optimise_the_grus(policy):
    model = model_of(policy)
    p = model.policy
    assert isinstance(p.lstm_actor, nn.GRU) and isinstance(p.lstm_critic, nn.GRU)
    assert not any(isinstance(m, nn.LSTM) for m in p.modules())
    assert p.lstm_actor.hidden_size == 8 and p.lstm_actor.num_layers == 1
    assert p.state_dict()["lstm_actor.weight_hh_l0"].shape == (3 * 8, 8)  # 3 gates (LSTM: 4)
    optimised = {id(q) for g in p.optimizer.param_groups for q in g["params"]}
    assert optimised == {id(q) for q in p.parameters()}
    # the rollout state keeps sb3-contrib's (h, c) form: c stays zero
    model.learn(64)
    h, c = model._last_lstm_states.pi
    assert h.abs().sum() > 0 and c.abs().sum() == 0
    with pytest.raises(ValueError, match="recurrent_cell='rnn'"):
        recurrent_policy_class("rnn")
    assert recurrent_policy_class("gru") is TemperatureMlpGruPolicy


def test_gru_recurrence_equals_stepping_with_resets(rng):
    gru = nn.GRU(5, 4, num_layers=2)
    n_seq, length = 3, 6
    features = th.as_tensor(rng.normal(size=(n_seq * length, 5)), dtype=th.float32)
    h0 = th.as_tensor(rng.normal(size=(2, n_seq, 4)), dtype=th.float32)
    c0 = th.zeros_like(h0)
    starts = th.zeros(n_seq, length)
    starts[0, 3] = starts[2, 0] = 1.0
    with th.no_grad():
        out, (h, c) = process_sequence(features, (h0, c0), starts.flatten(), gru)
        calm, _ = process_sequence(features, (h0, c0), th.zeros(n_seq * length), gru)
    x = features.reshape(n_seq, length, 5)
    for s in range(n_seq):
        hidden = h0[:, s:s + 1]
        for t in range(length):
            if starts[s, t]:
                hidden = th.zeros_like(hidden)
            with th.no_grad():
                step, hidden = gru(x[s, t].view(1, 1, 5), hidden)
            th.testing.assert_close(out[s * length + t], step[0, 0], rtol=1e-5, atol=1e-6)
        th.testing.assert_close(h[:, s], hidden[:, 0], rtol=1e-5, atol=1e-6)
    assert th.equal(c, c0)
    # without starts: one call, equal to the loop on the sequences without a start
    th.testing.assert_close(calm[length:2 * length], out[length:2 * length], rtol=1e-5,
                            atol=1e-6)


@pytest.mark.parametrize("policy", [RecurrentReplicaSetPolicy, RecurrentReplicaSetGruPolicy])
def test_policy_for_spaces_keeps_the_recurrent_cells(policy):
    """Routing another cluster size rebuilds the policy: its hidden size, layers and weights
    are kept (sb3-contrib's constructor parameters leave the recurrent settings out)."""
    env = make_env()
    kwargs = dict(policy_kwargs(policy, env), n_lstm_layers=2)
    model = KLRecurrentPPO(policy, env, n_steps=32, batch_size=16, seed=0, device="cpu",
                           policy_kwargs=kwargs)
    other = policy_for_spaces(model.policy, env.observation_space, env.action_space)
    assert type(other) is policy and type(other.lstm_actor) is type(model.policy.lstm_actor)
    assert other.lstm_actor.hidden_size == 8 and other.lstm_critic.num_layers == 2
    obs = th.as_tensor(np.stack([env.observation_space.sample() for _ in range(3)]))
    zeros = th.zeros(2, 3, 8)
    with th.no_grad():
        logits = [p.get_distribution(obs, (zeros, zeros), th.ones(3))[0].distribution.logits
                  for p in (model.policy, other)]
    assert th.equal(*logits)


# ----------------------------------------------------------------------------- KL, save, load
@pytest.mark.parametrize("policy", GRU_POLICIES)
@pytest.mark.parametrize("sequence_length", [None, 8])
def test_kl_recurrent_ppo_trains_saves_and_loads_a_gru_policy(tmp_path, policy,
                                                              sequence_length):
    model = model_of(policy, sequence_length=sequence_length,
                     kl=KLConfig(kl_ref_coef_initial=0.5, kl_coef=0.1))
    model.set_reference_policy(model_of(policy, seed=1).policy)
    model.learn(128)
    assert model.logger.name_to_value["train/kl_ref"] > 0
    model.save(tmp_path / "model.zip")
    loaded = KLRecurrentPPO.load(tmp_path / "model.zip", env=make_env(), device="cpu")
    assert type(loaded.policy) is policy and isinstance(loaded.policy.lstm_actor, nn.GRU)
    assert type(loaded.reference_policy) is policy
    obs = model.env.reset()
    starts = np.ones(N_ENVS, dtype=bool)
    a, state_a = model.predict(obs, state=None, episode_start=starts, deterministic=True)
    b, state_b = loaded.predict(obs, state=None, episode_start=starts, deterministic=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state_a[0], state_b[0])
    assert loaded.num_minibatch_steps == model.num_minibatch_steps > 0


def test_reference_logits_of_a_gru_reference_equal_stepping_it():
    model = model_of(TemperatureMlpGruPolicy, kl=KLConfig(kl_ref_coef_initial=0.5))
    model.set_reference_policy(model_of(TemperatureMlpGruPolicy, seed=1).policy)
    model.updates_deferred = True
    model.learn(64)
    buffer = model.rollout_buffer
    assert buffer.episode_starts[1:].sum() >= 1  # an episode starts inside the rollout
    for env in range(N_ENVS):
        state = (th.zeros(1, 1, 8), th.zeros(1, 1, 8))
        for t in range(32):
            with th.no_grad():
                log_probs, state = action_log_probs(
                    model.reference_policy, th.as_tensor(buffer.observations[t, env][None]),
                    state, th.as_tensor(buffer.episode_starts[t, env][None], dtype=th.float32))
            np.testing.assert_allclose(buffer.ref_logits[t, env], log_probs[0].numpy(),
                                       atol=2e-6)
        assert th.allclose(model._reference_lstm_states[0][:, env], state[0][:, 0], atol=2e-6)


# ----------------------------------------------------------------------------- cloning
@pytest.mark.slow
def test_bc_clones_lor_into_a_gru_policy_that_loads_with_the_documented_classes(tmp_path):
    env, trajectories = collect_lor(8, 128)
    ppo = PPOConfig(algorithm="recurrent_ppo", policy="mlp", recurrent_cell="gru",
                    net_arch=(32,), lstm_hidden_size=16)
    result = clone_demonstrations(
        trajectories, env=env, bc=BCConfig(epochs=25, batch_size=4, sequence_length=16),
        ppo=ppo, seed=0, validation_fraction=0.25, value_pretraining=True, expert="lor")
    policy = result.model.policy
    assert type(policy) is TemperatureMlpGruPolicy
    assert result.summary["val_tie_accuracy"] >= 0.9, result.summary
    path = save_pretrained(tmp_path / "bc.zip", policy, {}, result.obs_rms,
                           observation_schema=env.unwrapped.layout.schema())
    validate_pretrained(path, env, expected_arch=expected_architecture(ppo))
    with pytest.raises(PretrainedMismatchError, match="policy class"):
        validate_pretrained(path, env, expected_arch=expected_architecture(
            PPOConfig(algorithm="recurrent_ppo", policy="mlp", net_arch=(32,),
                      lstm_hidden_size=16)))
    model, _, _ = load_pretrained(path)
    again = RecurrentPPO.load(path, device="cpu")  # the stock algorithm loads it too
    obs = th.as_tensor(result.obs_rms.mean[None].astype(np.float32)).repeat(3, 1)
    zeros = th.zeros(1, 3, 16)
    states = RNNStates((zeros, zeros), (zeros, zeros))
    with th.no_grad():
        expected = policy.get_distribution(obs, states.pi, th.ones(3))[0].distribution.logits
        for other in (model.policy, again.policy):
            logits = other.get_distribution(obs, states.pi, th.ones(3))[0].distribution.logits
            assert th.equal(logits, expected)


# ----------------------------------------------------------------------------- main job
def test_config_selects_the_cell_and_sequence_length():
    from sb3_warmstart.pipeline.envs import make_training_venv, training_env_spec
    from sb3_warmstart.pipeline.ppo_stage import make_model
    from sb3_warmstart.policies.replica_set import RecurrentReplicaSetPolicy

    def config(policy: str, **ppo):
        return load_config(overrides={
            "family": None, "env_kwargs": {"episode_requests": 32},
            "ppo": {"algorithm": "recurrent_ppo", "policy": policy, **ppo}})

    gru = config("mlp", recurrent_cell="gru", sequence_length=16)
    venv = make_training_venv(training_env_spec(gru), seed=0, n_envs=2, gamma=0.99,
                              norm_reward=True, paired_baseline=None)
    model = make_model(gru, venv, warm=True)
    assert type(model.policy) is TemperatureMlpGruPolicy and model.sequence_length == 16
    lstm = make_model(config("mlp"), venv, warm=True)
    assert type(lstm.policy) is TemperatureMlpLstmPolicy and lstm.sequence_length == 32
    stock = make_model(config("mlp", sequence_length=None), venv, warm=True)
    assert stock.sequence_length is None
    set_gru = make_model(config("replica_set", recurrent_cell="gru"), venv, warm=True)
    assert type(set_gru.policy) is RecurrentReplicaSetGruPolicy
    assert isinstance(set_gru.policy.lstm_actor, nn.GRU) and set_gru.sequence_length == 32
    set_lstm = make_model(config("replica_set"), venv, warm=True)
    assert type(set_lstm.policy) is RecurrentReplicaSetPolicy
    with pytest.raises(ValueError, match="recurrent_cell"):
        load_config(overrides={"ppo": {"recurrent_cell": "rnn"}})
    with pytest.raises(ValueError, match="sequence_length=0"):
        load_config(overrides={"ppo": {"sequence_length": 0}})


@pytest.mark.slow
def test_main_job_trains_a_gru_router(tmp_path):
    from conftest import load_script
    from test_pipeline import TINY

    out = tmp_path / "run"
    load_script("warmstart").main([*TINY, "--output-dir", str(out),
                                   "--set", "ppo.recurrent_cell=gru"])
    final = KLRecurrentPPO.load(out / "final_model.zip", device="cpu")
    assert type(final.policy) is TemperatureMlpGruPolicy and final.sequence_length == 32
    clone = RecurrentPPO.load(out / "pretrained" / "bc_policy.zip", device="cpu")
    assert type(clone.policy) is TemperatureMlpGruPolicy
    summary = json.loads((Path(out) / "report" / "summary.json").read_text())
    assert 0 < summary["routers"]["ppo"]["e2e_mean"] < 100


@pytest.mark.slow
def test_the_generalist_trains_a_recurrent_replica_set_gru_router(tmp_path):
    """The main job's replica-set policy with GRU cells across a scenario family: BC, PPO with
    sequence batching, the report, and the router that loads it for another cluster size."""
    from conftest import load_script
    from test_generalist import TINY_FAMILY

    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.tools.evaluation import run_episode
    from sb3_warmstart.policies.router import load_policy_router

    out = tmp_path / "run"
    load_script("warmstart").main([*TINY_FAMILY, "--output-dir", str(out),
                                   "--set", "ppo.algorithm=recurrent_ppo",
                                   "--set", "ppo.recurrent_cell=gru",
                                   "--set", "ppo.lstm_hidden_size=16"])
    final = KLRecurrentPPO.load(out / "final_model.zip", device="cpu")
    assert type(final.policy) is RecurrentReplicaSetGruPolicy and final.sequence_length == 32
    assert type(final.reference_policy) is RecurrentReplicaSetGruPolicy
    router = load_policy_router(out)
    assert router.recurrent and isinstance(router.policy.lstm_actor, nn.GRU)
    env = LLMClusterEnv(scenario="a100x4_conv_70", num_replicas=3, episode_requests=40)
    metrics, _ = run_episode(env, router, seed=1)
    assert metrics["num_requests"] == 40
