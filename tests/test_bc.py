"""Sequence behaviour cloning, VecNormalize parity, checkpoints + validation, PolicyRouter, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

pytestmark = pytest.mark.train

import torch as th  # noqa: E402
from imitation.data.types import TrajectoryWithRew  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy  # noqa: E402
from sb3_contrib.common.recurrent.type_aliases import RNNStates  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize  # noqa: E402

import llm_cluster_env  # noqa: E402
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402
from llm_cluster_env.routing.heuristics import make_router  # noqa: E402
from llm_cluster_env.tools.evaluation import run_episode  # noqa: E402
from sb3_warmstart.common.normalize import (  # noqa: E402
    ObsNormalizer,
    fit_obs_normalizer,
    fit_return_normalizer,
)
from sb3_warmstart.pipeline.config import BCConfig, WarmStartConfig  # noqa: E402
from sb3_warmstart.policies.policy_file import (  # noqa: E402
    PretrainedCheckpointError,
    PretrainedMismatchError,
    architecture_of,
    build_model,
    load_pretrained,
    read_metadata,
    save_pretrained,
    validate_pretrained,
)
from sb3_warmstart.policies.router import PolicyRouter  # noqa: E402
from sb3_warmstart.warmstart.bc import (  # noqa: E402
    PRESETS,
    RouterTies,
    SequenceBC,
    critic_only_parameters,
    discounted_returns,
    plan_lanes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO = "a100x4_conv_70"


BC_FIELDS = {f for f in BCConfig.__dataclass_fields__}


def make_bc(*, validation_fraction: float = 0.2, value_pretraining: bool = True,
            gamma: float = 0.99, **kwargs) -> SequenceBC:
    """``SequenceBC`` with BC hyperparameters given flat (they become its ``BCConfig``)."""
    config = BCConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in BC_FIELDS})
    return SequenceBC(config=config, validation_fraction=validation_fraction,
                      value_pretraining=value_pretraining, gamma=gamma, **kwargs)


def collect_lor(num_episodes: int, episode_requests: int, seed0: int = 0, **env_kwargs):
    """``lor`` demonstrations as imitation trajectories, plus the env they came from."""
    env = gym.make(llm_cluster_env.ENV_ID, scenario=SCENARIO, episode_requests=episode_requests,
                   **env_kwargs)
    unwrapped = env.unwrapped
    router = make_router("lor")
    trajectories = []
    for seed in range(seed0, seed0 + num_episodes):
        obs, _ = env.reset(seed=seed)
        router.reset(unwrapped.num_replicas, np.random.default_rng(seed))
        observations, actions, rewards, done = [obs], [], [], False
        while not done:
            action = router.select(unwrapped.view)
            obs, reward, done, _, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
        trajectories.append(TrajectoryWithRew(
            obs=np.asarray(observations), acts=np.asarray(actions), infos=None, terminal=True,
            rews=np.asarray(rewards, dtype=np.float32)))
    return env, trajectories


@pytest.fixture(scope="module")
def small_demos():
    return collect_lor(6, 96)


def lstm_model(env, seed: int = 0, **policy_kwargs):
    kwargs = {"net_arch": [32, 32], "lstm_hidden_size": 16, **policy_kwargs}
    return build_model("MlpLstmPolicy", env.observation_space, env.action_space, recurrent=True,
                       policy_kwargs=kwargs, seed=seed)


def mlp_model(env, seed: int = 0):
    return build_model("MlpPolicy", env.observation_space, env.action_space, recurrent=False,
                       policy_kwargs={"net_arch": [64, 64]}, seed=seed)


# --------------------------------------------------------------------------- normalisation
def test_fit_obs_normalizer_uses_acting_observations_and_matches_vecnormalize(small_demos):
    env, trajs = small_demos
    rms = fit_obs_normalizer(trajs)
    acting = np.concatenate([t.obs[:-1] for t in trajs]).astype(np.float64)
    assert rms.count == len(acting) == sum(len(t.acts) for t in trajs)
    np.testing.assert_array_equal(rms.mean, acting.mean(axis=0))
    np.testing.assert_array_equal(rms.var, acting.var(axis=0))

    venv = VecNormalize(DummyVecEnv([lambda: gym.make(llm_cluster_env.ENV_ID, scenario=SCENARIO,
                                                      episode_requests=16)]))
    venv.obs_rms = rms.copy()
    obs = np.concatenate([t.obs for t in trajs])
    ours = ObsNormalizer(rms)(obs)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, venv.normalize_obs(obs))
    assert np.abs(ours).max() <= 10.0
    # the statistics load back into VecNormalize unchanged, and refuse other settings
    other = VecNormalize(venv.venv, clip_obs=5.0)
    with pytest.raises(ValueError, match="clip_obs: statistics 10.0, VecNormalize 5.0"):
        ObsNormalizer(rms).apply_to(other)
    fresh = VecNormalize(venv.venv)
    ObsNormalizer(rms).apply_to(fresh)
    np.testing.assert_array_equal(fresh.normalize_obs(obs), ours)


def test_return_normalizer_matches_vecnormalize_reward_statistics(small_demos):
    env, trajs = small_demos
    gamma = 0.97
    ours = fit_return_normalizer(trajs, gamma)
    venv = VecNormalize(DummyVecEnv([lambda: gym.make(llm_cluster_env.ENV_ID, scenario=SCENARIO,
                                                      episode_requests=16)]), gamma=gamma)
    for traj in trajs:  # what step_wait does with the rewards of one env, episode by episode
        venv.returns = np.zeros(1)
        for r in traj.rews:
            venv._update_reward(np.array([r], dtype=np.float64))
    assert ours.ret_rms.var == pytest.approx(float(venv.ret_rms.var), rel=1e-6)
    rews = trajs[0].rews[:20].astype(np.float64)
    np.testing.assert_allclose(ours(rews), venv.normalize_reward(rews), rtol=1e-5)
    np.testing.assert_allclose(discounted_returns(np.array([1.0, 2.0, 4.0]), 0.5),
                               [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0])


# ------------------------------------------------------------------------------ batching
def test_plan_lanes_covers_every_step_once_in_order(rng):
    lengths = rng.integers(1, 50, size=23)
    order = rng.permutation(len(lengths))
    lanes = plan_lanes(lengths, order, sequence_length=7, num_lanes=4)
    seen = {j: [] for j in range(len(lengths))}
    for lane in lanes:
        for prev, chunk in zip([None] + lane[:-1], lane):
            assert 0 < chunk.stop - chunk.start <= 7
            if chunk.start > 0:  # a continuation directly follows its predecessor in the lane
                assert prev is not None and prev.trajectory == chunk.trajectory
                assert prev.stop == chunk.start
            seen[chunk.trajectory].append((chunk.start, chunk.stop))
    for j, spans in seen.items():
        assert spans[0][0] == 0 and spans[-1][1] == lengths[j]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    total_chunks = sum(-(-n // 7) for n in lengths)
    # balanced: the longest lane exceeds the mean by less than one trajectory's chunks
    assert max(map(len, lanes)) < total_chunks / 4 + max(-(-n // 7) for n in lengths)


# ------------------------------------------------------------------- forward equivalence
def _rollout_reference(policy: RecurrentActorCriticPolicy, obs: np.ndarray, acts: np.ndarray):
    """Step-by-step through the policy's public rollout methods, as RecurrentPPO runs it."""
    shape = policy.lstm_hidden_state_shape
    zeros = th.zeros(shape)
    states = RNNStates((zeros, zeros.clone()), (zeros.clone(), zeros.clone()))
    logps, values, modes = [], [], []
    with th.no_grad():
        for t in range(len(acts)):
            o = th.as_tensor(obs[t:t + 1])
            start = th.tensor([1.0 if t == 0 else 0.0])
            dist, _ = policy.get_distribution(o, states.pi, start)
            _, value, _, states = policy.forward(o, states, start, deterministic=True)
            logps.append(float(dist.log_prob(th.tensor([int(acts[t])]))))
            modes.append(int(dist.mode()))
            values.append(float(value))
    return np.array(logps), np.array(values), np.array(modes)


@pytest.mark.parametrize("critic", [{}, {"shared_lstm": True, "enable_critic_lstm": False},
                                    {"enable_critic_lstm": False}])
@pytest.mark.slow
def test_chunked_sequence_forward_equals_step_by_step_rollout(small_demos, critic):
    env, trajs = small_demos
    # unequal lengths, a chunk length that divides none of them, more trajectories than lanes
    cut = [TrajectoryWithRew(obs=t.obs[:n + 1], acts=t.acts[:n], infos=None, terminal=True,
                             rews=t.rews[:n]) for t, n in zip(trajs, (96, 41, 77, 13, 60, 96))]
    model = lstm_model(env, **critic)
    norm = ObsNormalizer(fit_obs_normalizer(cut))
    bc = make_bc(policy=model.policy, trajectories=cut, rng=np.random.default_rng(1),
                    obs_normalizer=norm, validation_fraction=0.0, batch_size=2,
                    sequence_length=7, value_pretraining=True)
    chunked = bc.predict_split("train", sequence_length=7)
    whole = bc.predict_split("train")
    np.testing.assert_allclose(chunked["logp"], whole["logp"], atol=1e-5)
    np.testing.assert_allclose(chunked["value"], whole["value"], atol=1e-5)
    offsets = np.concatenate([[0], np.cumsum(bc.train_data.lengths)])
    for k, j in enumerate(bc.train_data.trajectory_ids):
        sl = slice(offsets[k], offsets[k + 1])
        logp, value, mode = _rollout_reference(model.policy, norm(cut[j].obs), cut[j].acts)
        np.testing.assert_allclose(chunked["logp"][sl], logp, atol=1e-5)
        np.testing.assert_allclose(chunked["value"][sl], value, atol=1e-5)
        np.testing.assert_array_equal(chunked["pred"][sl], mode)


@pytest.mark.slow
def test_feed_forward_forward_equals_evaluate_actions(small_demos):
    env, trajs = small_demos
    model = mlp_model(env)
    norm = ObsNormalizer(fit_obs_normalizer(trajs))
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=norm, validation_fraction=0.0)
    out = bc.predict_split("train")
    obs = th.as_tensor(np.concatenate([norm(trajs[j].obs[:-1])
                                       for j in bc.train_data.trajectory_ids]))
    acts = th.as_tensor(np.concatenate([trajs[j].acts for j in bc.train_data.trajectory_ids]))
    with th.no_grad():
        values, logp, _ = model.policy.evaluate_actions(obs, acts)
    np.testing.assert_allclose(out["logp"], logp.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["value"], values.flatten().numpy(), atol=1e-6)


# ------------------------------------------------------------------------------- training
def test_without_value_pretraining_the_critic_is_untouched_and_loss_is_logged(
        small_demos, tmp_path):
    from stable_baselines3.common.logger import configure

    env, trajs = small_demos
    model = lstm_model(env)
    critic = {id(p): p.detach().clone() for p in critic_only_parameters(model.policy)}
    assert len(critic) >= 4  # value_net, the critic MLP and the critic LSTM
    actor_before = model.policy.action_net.weight.detach().clone()
    logger = configure(str(tmp_path), ["csv"])
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=fit_obs_normalizer(trajs), epochs=2, batch_size=2,
                    sequence_length=16, value_pretraining=False, weight_decay=0.01,
                    tied_choices=RouterTies(make_router("lor"), env.unwrapped.layout),
                    logger=logger)
    history = bc.train()
    for p in critic_only_parameters(model.policy):
        assert th.equal(p.detach(), critic[id(p)])
    assert not th.equal(model.policy.action_net.weight.detach(), actor_before)
    assert [m.epoch for m in history] == [1, 2]
    assert history[1].gradient_steps == 2 * history[0].gradient_steps > 0
    val = history[-1].val
    assert val is not None and val.num_steps == 96  # one of six 96-step trajectories
    assert sum(val.predicted_share) == pytest.approx(1.0)
    assert sum(val.expert_share) == pytest.approx(1.0)
    assert val.tie_accuracy >= val.accuracy  # the expert's own choice is always in its tie set
    assert np.isnan(history[-1].train_value_loss) and np.isnan(val.value_loss)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train/neglogp", "train/entropy", "train/loss", "train/accuracy",
                "train/learning_rate", "val/accuracy", "val/tie_accuracy", "val/nll",
                "val/predicted_share_0", "val/expert_share_3"):
        assert key in header


@pytest.mark.slow
def test_value_pretraining_fits_discounted_returns(small_demos):
    env, trajs = small_demos
    model = lstm_model(env)
    returns = fit_return_normalizer(trajs, 0.99)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=fit_obs_normalizer(trajs), epochs=25, batch_size=4,
                    sequence_length=32, learning_rate=3e-3, value_pretraining=True, gamma=0.99,
                    return_normalizer=returns)
    before = bc.evaluate("train").value_loss
    bc.train()
    after = bc.evaluate("train").value_loss
    target_var = float(np.var(bc.train_data.returns[:-1].numpy()))
    assert after < 0.25 * before
    assert after < 0.5 * target_var  # explains over half of the returns' variance


def test_cosine_schedule_and_bad_arguments(small_demos):
    env, trajs = small_demos
    model = lstm_model(env)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=None, epochs=3, batch_size=4, learning_rate=1e-3,
                    lr_schedule="cosine", min_learning_rate=1e-5, value_pretraining=False)
    lrs = [m.learning_rate for m in bc.train()]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] > 1e-5
    assert bc.train() == [] and len(bc.history) == 3  # the schedule never runs past its end
    common = dict(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                  obs_normalizer=None)
    for kwargs, message in (({"sequence_length": 0}, "sequence_length=0"),
                            ({"validation_fraction": 1.0}, "validation_fraction=1.0"),
                            ({"lr_schedule": "step"}, "lr_schedule='step'"),
                            ({"learning_rate": -1.0}, "learning_rate=-1.0")):
        with pytest.raises(ValueError, match=message):
            make_bc(**common, **kwargs)
    no_rews = [TrajectoryWithRew(obs=t.obs, acts=t.acts, infos=None, terminal=True,
                                 rews=t.rews) for t in trajs]
    object.__setattr__(no_rews[2], "rews", None)
    with pytest.raises(ValueError, match=r"trajectories\[2\] has no rews"):
        make_bc(**{**common, "trajectories": no_rews}, value_pretraining=True)
    bad = list(trajs)
    bad[1] = TrajectoryWithRew(obs=trajs[1].obs[:, :30], acts=trajs[1].acts, infos=None,
                               terminal=True, rews=trajs[1].rews)
    with pytest.raises(ValueError, match=r"trajectories\[1\].obs: shape \(97, 30\)"):
        make_bc(**{**common, "trajectories": bad})


def test_presets_build_the_documented_policies():
    std, enh = PRESETS["standard"], PRESETS["enhanced"]
    assert std.bc == BCConfig(epochs=60) and std.ppo() == std.ppo(gamma=0.99)
    assert std.ppo().policy == "mlp" and std.ppo().recurrent
    assert enh.ppo().lstm_hidden_size > std.ppo().lstm_hidden_size
    assert enh.ppo().net_arch[0] > std.ppo().net_arch[0]
    assert enh.bc.epochs > std.bc.epochs and enh.bc.weight_decay > 0
    assert std.ppo(algorithm="ppo").policy_kwargs() == {
        "net_arch": {"pi": [64, 64], "vf": [64, 64]}}
    assert std.ppo().policy_kwargs()["lstm_hidden_size"] == 64


class TaggedLstmPolicy(RecurrentActorCriticPolicy):
    """A subclass with an extra constructor argument, as other modules write them."""

    def __init__(self, *args, tag: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag

    def _get_constructor_parameters(self):
        return {**super()._get_constructor_parameters(), "tag": self.tag}


@pytest.mark.slow
def test_floor_lstm_clone_of_lor_matches_lor(capsys):
    """>= 95% tie-aware validation accuracy (lor breaks ties at random, so exact agreement is
    capped by how often replicas tie), and within 5% of lor's mean E2E on held-out seeds."""
    start = time.perf_counter()
    env, trajs = collect_lor(48, 256)
    model = lstm_model(env, net_arch=[64, 64], lstm_hidden_size=64)
    rms = fit_obs_normalizer(trajs)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=rms, epochs=60, batch_size=16, sequence_length=32,
                    learning_rate=2e-3, lr_schedule="cosine", min_learning_rate=1e-5,
                    value_pretraining=True, return_normalizer=fit_return_normalizer(trajs, 0.99),
                    tied_choices=RouterTies(make_router("lor"), env.unwrapped.layout))
    val = bc.train()[-1].val
    bc_seconds = time.perf_counter() - start
    eval_env = LLMClusterEnv(scenario=SCENARIO, episode_requests=512)
    clone, lor = PolicyRouter(model, rms), make_router("lor")
    seeds = range(10_000, 10_004)  # demos used seeds 0..47
    clone_e2e = np.mean([run_episode(eval_env, clone, s)[0]["e2e_mean"] for s in seeds])
    lor_e2e = np.mean([run_episode(eval_env, lor, s)[0]["e2e_mean"] for s in seeds])
    with capsys.disabled():
        print(f"\n[floor] lstm clone of lor: val acc {val.accuracy:.4f}, tie-aware "
              f"{val.tie_accuracy:.4f}, nll {val.nll:.4f}; held-out E2E clone {clone_e2e:.3f} s"
              f" vs lor {lor_e2e:.3f} s ({100 * (clone_e2e / lor_e2e - 1):+.2f}%); "
              f"demos+BC {bc_seconds:.1f} s, total {time.perf_counter() - start:.1f} s")
    assert val.tie_accuracy >= 0.95
    assert val.tie_accuracy >= val.accuracy
    assert abs(clone_e2e / lor_e2e - 1.0) <= 0.05
    np.testing.assert_allclose(val.predicted_share, val.expert_share, atol=0.02)


@pytest.mark.slow
def test_feed_forward_bc_clones_lor():
    env, trajs = collect_lor(16, 256)
    model = mlp_model(env)
    rms = fit_obs_normalizer(trajs)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=rms, epochs=30, batch_size=8, sequence_length=32,
                    learning_rate=2e-3, lr_schedule="cosine", value_pretraining=True,
                    return_normalizer=fit_return_normalizer(trajs, 0.99),
                    tied_choices=RouterTies(make_router("lor"), env.unwrapped.layout))
    val = bc.train()[-1].val
    assert val.tie_accuracy >= 0.9 and val.tie_accuracy >= val.accuracy  # lor ties are random
    eval_env = LLMClusterEnv(scenario=SCENARIO, episode_requests=256)
    clone = np.mean([run_episode(eval_env, PolicyRouter(model, rms), s)[0]["e2e_mean"]
                     for s in (500, 501)])
    lor = np.mean([run_episode(eval_env, make_router("lor"), s)[0]["e2e_mean"]
                   for s in (500, 501)])
    assert abs(clone / lor - 1.0) <= 0.05


# ---------------------------------------------------------------------------- checkpoints
def _logits(policy, obs: np.ndarray) -> np.ndarray:
    """Action logits along one trajectory, carrying the LSTM state as at rollout time."""
    out = []
    with th.no_grad():
        if isinstance(policy, RecurrentActorCriticPolicy):
            z = th.zeros(policy.lstm_hidden_state_shape)
            state = (z, z.clone())
            for t, row in enumerate(obs):
                dist, state = policy.get_distribution(th.as_tensor(row[None]), state,
                                                      th.tensor([float(t == 0)]))
                out.append(dist.distribution.logits.numpy()[0])
        else:
            out = policy.get_distribution(th.as_tensor(obs)).distribution.logits.numpy()
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["lstm", "mlp", "subclass"])
def test_checkpoint_roundtrip_gives_identical_logits(small_demos, tmp_path, kind):
    env, trajs = small_demos
    if kind == "subclass":
        model = build_model(TaggedLstmPolicy, env.observation_space, env.action_space,
                            recurrent=True, seed=0, policy_kwargs={
                                "net_arch": [32, 32], "lstm_hidden_size": 16, "tag": "kl-ref"})
    else:
        model = lstm_model(env) if kind == "lstm" else mlp_model(env)
    rms = fit_obs_normalizer(trajs)
    ret = fit_return_normalizer(trajs, 0.99)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                    obs_normalizer=rms, epochs=1, batch_size=2, return_normalizer=ret)
    bc.train()
    metadata = {"bc_metrics": bc.history[-1], "demos": {"source": "test"}}
    schema = env.unwrapped.layout.schema()
    if kind == "mlp":  # the schema may also travel inside the metadata
        path = save_pretrained(tmp_path / "bc", model.policy,
                               {**metadata, "observation_schema": schema}, rms,
                               return_normalizer=ret)
    else:
        path = save_pretrained(tmp_path / "bc", model.policy, metadata, rms,
                               observation_schema=schema, return_normalizer=ret)
    assert path == tmp_path / "bc.zip" and [p.name for p in tmp_path.iterdir()] == ["bc.zip"]
    loaded, meta, loaded_rms = load_pretrained(path)
    assert type(loaded) is (PPO if kind == "mlp" else RecurrentPPO)
    assert type(loaded.policy) is type(model.policy)
    obs = ObsNormalizer(rms)(trajs[0].obs[:-1])
    np.testing.assert_array_equal(_logits(loaded.policy, obs), _logits(model.policy, obs))
    for key, value in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[key], value), key
    np.testing.assert_array_equal(loaded_rms.mean, rms.mean)
    np.testing.assert_array_equal(loaded_rms.var, rms.var)
    assert loaded_rms.count == rms.count
    assert meta["observation_schema"] == env.unwrapped.layout.schema()
    assert meta["architecture"] == architecture_of(model.policy)
    assert meta["obs_normalization"]["clip_obs"] == 10.0
    assert meta["obs_normalization"]["epsilon"] == 1e-8
    assert meta["return_normalization"]["var"] == pytest.approx(float(ret.ret_rms.var))
    assert meta["demos"] == {"source": "test"}
    assert meta["bc_metrics"]["epoch"] == 1
    assert {"torch", "stable-baselines3", "sb3-contrib", "gymnasium"} <= set(meta["versions"])
    if kind == "lstm":
        assert meta["architecture"]["lstm_hidden_size"] == 16
        assert RecurrentPPO.load(path).policy.lstm_actor.hidden_size == 16  # stock SB3 loader
    if kind == "subclass":
        assert loaded.policy.tag == "kl-ref"
    validate_pretrained(path, env, expected_arch=architecture_of(model.policy))
    # the loaded model routes exactly like the trained one
    eval_env = LLMClusterEnv(scenario=SCENARIO, episode_requests=64)
    a = run_episode(eval_env, PolicyRouter(model, rms), 3)[0]
    b = run_episode(eval_env, PolicyRouter(loaded, loaded_rms), 3)[0]
    assert a["e2e_mean"] == b["e2e_mean"]


@pytest.fixture(scope="module")
def checkpoint(small_demos, tmp_path_factory):
    env, trajs = small_demos
    model = lstm_model(env)
    path = save_pretrained(tmp_path_factory.mktemp("ckpt") / "bc.zip", model.policy, {},
                           fit_obs_normalizer(trajs),
                           observation_schema=env.unwrapped.layout.schema())
    return path, model


def test_validator_lists_every_mismatch(checkpoint):
    path, model = checkpoint
    make = lambda **kw: gym.make(llm_cluster_env.ENV_ID, scenario=SCENARIO,  # noqa: E731
                                 episode_requests=8, **kw)
    validate_pretrained(path, make())
    validate_pretrained(path, VecNormalize(DummyVecEnv([make])))

    with pytest.raises(PretrainedMismatchError) as err:
        validate_pretrained(path, make(num_replicas=8))
    m = err.value.mismatches
    assert m[:3] == ["observation shape: checkpoint (46,), env (90,)",
                     "action count: checkpoint 4, env 8",
                     "num_replicas: checkpoint 4, env 8"]
    assert "observation feature 44: checkpoint has 'req/prompt_tokens_k', env has 'r4/queued'" in m
    assert "observation feature 89: checkpoint has none, env has 'global/arrival_rate'" in m
    assert m[-1] == "obs normalisation: statistics for 46 features, env observations have " \
                    "shape (90,)"
    assert len(m) == 3 + 46 + 1  # features 0..43 agree; 44..89 differ
    assert str(path) in str(err.value) and "50 mismatch(es)" in str(err.value)

    with pytest.raises(PretrainedMismatchError) as err:
        validate_pretrained(path, make(observation={"history_window": 1}))
    assert err.value.mismatches == [
        "observation shape: checkpoint (46,), env (50,)",
        "history_window: checkpoint 0, env 1",
        "observation feature 46: checkpoint has none, env has 'hist/t-1/r0'",
        "observation feature 47: checkpoint has none, env has 'hist/t-1/r1'",
        "observation feature 48: checkpoint has none, env has 'hist/t-1/r2'",
        "observation feature 49: checkpoint has none, env has 'hist/t-1/r3'",
        "obs normalisation: statistics for 46 features, env observations have shape (50,)",
    ]

    with pytest.raises(PretrainedMismatchError) as err:
        validate_pretrained(path, make(observation={"output_length_oracle": True}))
    assert err.value.mismatches == [
        "observation shape: checkpoint (46,), env (47,)",
        "output_length_oracle: checkpoint False, env True",
        "observation feature 45: checkpoint has 'global/arrival_rate', "
        "env has 'req/output_tokens_k'",
        "observation feature 46: checkpoint has none, env has 'global/arrival_rate'",
        "obs normalisation: statistics for 46 features, env observations have shape (47,)",
    ]

    meta = read_metadata(path)  # features reordered by a hypothetical older layout
    names = meta["observation_schema"]["feature_names"]
    names[11], names[12] = names[12], names[11]
    with pytest.raises(PretrainedMismatchError) as err:
        validate_pretrained(meta, make())
    assert err.value.mismatches == [
        "observation feature 11: checkpoint has 'r1/running', env has 'r1/queued'",
        "observation feature 12: checkpoint has 'r1/queued', env has 'r1/running'",
    ]

    with pytest.raises(PretrainedMismatchError) as err:
        validate_pretrained(path, make(), expected_arch={
            "lstm_hidden_size": 128, "net_arch": [64, 64], "policy_class": "MlpPolicy",
            "shared_lstm": False, "activation_fn": th.nn.ReLU})
    assert err.value.mismatches == [
        "lstm_hidden_size: checkpoint 16, expected 128",
        "net_arch: checkpoint {'pi': [32, 32], 'vf': [32, 32]}, "
        "expected {'pi': [64, 64], 'vf': [64, 64]}",
        "policy class: checkpoint 'sb3_contrib.common.recurrent.policies."
        "RecurrentActorCriticPolicy', expected 'stable_baselines3.common.policies."
        "ActorCriticPolicy'",
        "activation_fn: checkpoint 'torch.nn.modules.activation.Tanh', "
        "expected 'torch.nn.modules.activation.ReLU'",
    ]
    validate_pretrained(path, make(), expected_arch={
        "policy_class": "MlpLstmPolicy", "lstm_hidden_size": 16, "net_arch": [32, 32],
        "activation_fn": "Tanh", "enable_critic_lstm": True})
    with pytest.raises(ValueError, match="unknown key"):
        validate_pretrained(path, make(), expected_arch={"lstm_size": 16})


def test_missing_truncated_and_corrupt_checkpoints_raise_clear_errors(checkpoint, tmp_path):
    path, model = checkpoint
    data = path.read_bytes()
    with pytest.raises(PretrainedCheckpointError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nope.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedCheckpointError, match="not a complete zip archive"):
        load_pretrained(truncated)
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(PretrainedCheckpointError, match="not a complete zip archive"):
        load_pretrained(tmp_path / "empty.zip")
    mangled = bytearray(data)  # a broken central directory behind an intact end record
    mangled[len(data) - 200:len(data) - 40] = bytes(160)
    (tmp_path / "mangled.zip").write_bytes(bytes(mangled))
    with pytest.raises(PretrainedCheckpointError, match="not a readable zip archive|corrupt"):
        load_pretrained(tmp_path / "mangled.zip")
    with zipfile.ZipFile(path) as archive:  # flip a byte inside the policy weights
        info = archive.getinfo("policy.pth")
    corrupt = bytearray(data)
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    corrupt[at] ^= 0xFF
    (tmp_path / "corrupt.zip").write_bytes(bytes(corrupt))
    with pytest.raises(PretrainedCheckpointError, match="corrupt"):
        load_pretrained(tmp_path / "corrupt.zip")
    plain = tmp_path / "plain.zip"  # a stock SB3 save has no metadata
    model.save(plain)
    with pytest.raises(PretrainedCheckpointError, match=r"missing member\(s\) \['warmstart_meta.json'\]"):
        load_pretrained(plain)
    with pytest.raises(PretrainedCheckpointError, match="not a file"):
        read_metadata(tmp_path)


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(checkpoint, small_demos,
                                                                  tmp_path):
    path, model = checkpoint
    target = tmp_path / "bc.zip"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()
    with pytest.raises(TypeError, match=r"metadata\.demos\.when: object"):
        save_pretrained(target, model.policy, {"demos": {"when": object()}}, None,
                        observation_schema=None)
    with pytest.raises(ValueError, match=r"reserved"):
        save_pretrained(target, model.policy, {"architecture": {}}, None, observation_schema=None)
    with pytest.raises(ValueError, match=r"observation_schema: required"):
        save_pretrained(target, model.policy, {}, None)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bc.zip"]


# ---------------------------------------------------------------------------- the router
def test_policy_router_paths_agree_and_reset_restarts_the_lstm(small_demos):
    env, trajs = small_demos
    model = lstm_model(env)
    rms = fit_obs_normalizer(trajs)
    eval_env = LLMClusterEnv(scenario=SCENARIO, episode_requests=64)
    direct = PolicyRouter(model, rms)
    via_predict = PolicyRouter(model, rms, use_predict=True)
    actions = {}
    for name, router in (("direct", direct), ("predict", via_predict)):
        eval_env.reset(seed=9)
        router.reset(eval_env.num_replicas, np.random.default_rng(0))
        seq, done = [], False
        while not done:
            seq.append(router.select(eval_env.view))
            done = eval_env.step(seq[-1])[2]
        actions[name] = seq
    assert actions["direct"] == actions["predict"]
    first = run_episode(eval_env, direct, 4)[0]
    assert run_episode(eval_env, direct, 4)[0] == first  # reset() zeroes the LSTM state
    sampler = PolicyRouter(model, rms, deterministic=False)
    one = run_episode(eval_env, sampler, 4)[0]
    assert run_episode(eval_env, sampler, 4)[0] == one  # sampling draws from reset()'s rng
    with pytest.raises(ValueError, match="num_replicas=8: the policy routes to 4 replicas"):
        direct.reset(8, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"statistics have shape \(3,\)"):
        PolicyRouter(model, ObsNormalizer(fit_obs_normalizer(
            [TrajectoryWithRew(obs=np.ones((3, 3)), acts=np.zeros(2, int), infos=None,
                               terminal=True, rews=np.zeros(2, np.float32))])))


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_pretrain_cli_end_to_end_and_flag_errors(small_demos, tmp_path, capsys,
                                                  monkeypatch):
    from imitation.data import serialize

    spec = importlib.util.spec_from_file_location("pretrain", REPO_ROOT / "train" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain", pretrain)  # dataclasses look their module up
    spec.loader.exec_module(pretrain)

    env, trajs = small_demos
    demo = tmp_path / "demo"
    serialize.save(demo, trajs)
    out = tmp_path / "runs" / "bc"
    assert pretrain.main(["--demo", str(demo), "--output", str(out), "--epochs", "2",
                          "--batch-size", "2", "--sequence-length", "16", "--expert", "lor",
                          "--eval-episodes", "1", "--no-progress", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "val tie-aware acc." in printed and "predicted" in printed and "expert" in printed
    model, meta, rms = load_pretrained(tmp_path / "runs" / "bc.zip")
    validate_pretrained(tmp_path / "runs" / "bc.zip", env)
    assert meta["pretrain_args"]["bc"]["epochs"] == 2 and meta["demos"]["trajectories"] == 6
    assert meta["pretrain_args"]["bc"]["lr_schedule"] == PRESETS["standard"].bc.lr_schedule
    assert meta["command"][:3] == ["train/pretrain.py", "--demo", str(demo)]
    assert len(meta["bc_metrics"]["history"]) == 2
    assert meta["bc_metrics"]["final"]["eval"]["ratio"] > 0
    assert rms.count == sum(len(t.acts) for t in trajs)

    # with stats.json: the env comes from it, the expert too, and env flags are refused
    (demo / "stats.json").write_text(json.dumps({
        "env_kwargs": {"scenario": SCENARIO, "episode_requests": 96},
        "schema": env.unwrapped.layout.schema(), "weights": {"lor": 1.0}}))
    job = pretrain.parse_args(["--demo", str(demo), "--output", str(out)])
    assert job.expert == "lor"
    assert job.config.env.episode_requests == 96 and job.config.env.name == SCENARIO
    # defaults are the configs': the preset's BC and architecture, PPO's discount
    assert job.config.bc == PRESETS["standard"].bc
    assert job.config.ppo == PRESETS["standard"].ppo(algorithm="recurrent_ppo")
    assert job.config.warm_start.validation_fraction == WarmStartConfig().validation_fraction
    for argv, message in (
            (["--qps", "5"], "--qps=5.0: the demos' stats.json fixes the env"),
            (["--epochs", "0"], "bc.epochs=0: must be >= 1"),
            (["--lr", "nan"], "bc.learning_rate=nan: must be a finite number > 0"),
            (["--gamma", "2"], "ppo.gamma=2.0: must be in (0, 1]"),
            (["--mode", "huge"], "argument --mode: invalid choice: 'huge'"),
            (["--policy-type", "gru"], "argument --policy-type: invalid choice: 'gru'"),
            (["--val-fraction", "1"], "warm_start.validation_fraction=1.0: must be in [0, 1)"),
            (["--eval-episodes", "-1"], "--eval-episodes=-1: must be >= 0"),
            (["--expert", "best"], "argument --expert: invalid choice: 'best'")):
        with pytest.raises(SystemExit) as exit_info:
            pretrain.parse_args(["--demo", str(demo), "--output", str(out), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--demo", str(tmp_path / "none"), "--output", str(out)])
    assert "--demo=" in capsys.readouterr().err
    assert not Path(str(out) + ".zip.tmp").exists()


def test_progress_prints_plain_bc_lines_when_piped_and_nothing_else(small_demos, capsys):
    """No per-epoch lines interleaved with a bar: piped output gets [BC] progress lines only."""
    env, trajs = small_demos
    model = lstm_model(env)
    make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
            obs_normalizer=fit_obs_normalizer(trajs), epochs=2, batch_size=2,
            sequence_length=16, value_pretraining=False, progress=True).train()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[BC] 0/2 epochs (0%)" and lines[-1].startswith("[BC] 2/2 epochs (100%)")
    assert all(line.startswith("[BC] ") for line in lines) and len(lines) <= 3


# ------------------------------------------------------------------------- action targets
def _trained_weights(env, trajs, targets, recurrent: bool):
    model = lstm_model(env) if recurrent else mlp_model(env)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                 obs_normalizer=fit_obs_normalizer(trajs), epochs=2, batch_size=2,
                 sequence_length=16, value_pretraining=False, action_targets=targets)
    history = bc.train()
    return [p.detach().clone() for p in model.policy.parameters()], history


@pytest.mark.parametrize("recurrent", [False, True])
def test_one_hot_action_targets_train_exactly_as_the_recorded_actions(small_demos, recurrent):
    """Targets that put all weight on the recorded action are the recorded actions: the same
    losses and the same weights, to float rounding (a ``None`` entry stands for them too)."""
    env, trajs = small_demos
    n = env.action_space.n
    one_hot = [np.eye(n, dtype=np.float32)[t.acts] for t in trajs]
    one_hot[1] = None
    plain, plain_history = _trained_weights(env, trajs, None, recurrent)
    targeted, targeted_history = _trained_weights(env, trajs, one_hot, recurrent)
    for a, b in zip(plain, targeted):
        assert th.allclose(a, b, rtol=0, atol=1e-6)
    assert [m.train_neglogp for m in targeted_history] == pytest.approx(
        [m.train_neglogp for m in plain_history], rel=1e-5)


def test_soft_action_targets_are_learned_as_distributions(small_demos):
    """Trained long enough on one fixed target distribution, the policy's probabilities
    approach it (the loss is the cross-entropy to the targets, not to their argmax)."""
    env, trajs = small_demos
    n = env.action_space.n
    wanted = np.array([0.6, 0.3, 0.1, 0.0][:n] + [0.0] * max(0, n - 4), np.float32)
    targets = [np.tile(wanted, (len(t.acts), 1)) for t in trajs]
    model = mlp_model(env)
    bc = make_bc(policy=model.policy, trajectories=trajs, rng=np.random.default_rng(0),
                 obs_normalizer=fit_obs_normalizer(trajs), epochs=40, batch_size=8,
                 sequence_length=16, value_pretraining=False, learning_rate=3e-3,
                 ent_coef=0.0, action_targets=targets, validation_fraction=0.0)
    bc.train()
    with th.no_grad():
        obs = bc.train_data.obs[:-1]  # the normalised training observations
        probs = model.policy.get_distribution(obs).distribution.probs.numpy()
    np.testing.assert_allclose(probs.mean(axis=0), wanted, atol=0.03)


@pytest.mark.parametrize("targets, message", [
    (lambda trajs, n: [np.full((len(t.acts), n), 1.0 / n) for t in trajs[:-1]],
     r"action_targets: 5 entries for 6 trajectories"),
    (lambda trajs, n: [np.full((len(t.acts), n + 1), 1.0 / (n + 1)) for t in trajs],
     r"^action_targets\[0\]\.shape=\(96, 5\): must be \(96, 4\)"),
    (lambda trajs, n: [np.full((len(t.acts), n), 0.5) for t in trajs],
     r"^action_targets\[0\]='rows': must be distributions"),
])
def test_bad_action_targets_are_refused_naming_the_entry(small_demos, targets, message):
    env, trajs = small_demos
    with pytest.raises(ValueError, match=message):
        make_bc(policy=mlp_model(env).policy, trajectories=trajs, rng=np.random.default_rng(0),
                obs_normalizer=fit_obs_normalizer(trajs), value_pretraining=False,
                action_targets=targets(trajs, env.action_space.n))
