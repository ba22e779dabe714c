"""Callbacks and normaliser: stabilisation, temperature control, monitoring, frozen statistics.

The policy/algorithm attributes the callbacks drive (``temperature``, ``uniform_actions``,
``updates_deferred``) are honoured here by small stand-ins, so these tests do not depend on
``sb3_warmstart.policies.recurrent``/``ppo``.
"""

from __future__ import annotations

import csv
import functools
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

import llm_cluster_env  # noqa: F401  (registers LLMCluster-v0)
from llm_cluster_env.sim.metrics import balance_score
from sb3_warmstart.algorithms.callbacks import (
    EPISODE_METRICS,
    NormalizerStabilization,
    TemperatureController,
    TrainingMonitor,
)
from sb3_warmstart.common.normalize import (
    FrozenRunningMeanStd,
    freeze_obs_stats,
    make_vec_normalize,
    obs_stats_frozen,
)
from sb3_warmstart.pipeline.config import TemperatureConfig


def make_controller(**kwargs) -> TemperatureController:
    """A controller with ``kwargs``; the rule tests below were written for a ceiling of 3 and
    the ``0.5 ln N`` entropy target, so those are the base here (the rest: the config's)."""
    return TemperatureController(TemperatureConfig(
        **{"target_entropy": None, "max_temperature": 3.0, **kwargs}))


pytestmark = pytest.mark.train

N = 4
EPISODE = 64
N_STEPS = 64
ENV_KWARGS = {"scenario": "a100x4_conv_70", "episode_requests": EPISODE, "num_replicas": N}


# ------------------------------------------------------------------ stand-ins
class _TemperatureMixin:
    """Honours ``temperature`` (logits / T) and ``uniform_actions`` (all logits equal)."""

    def _init_temperature(self) -> None:
        self.temperature = 1.0
        self.uniform_actions = False

    def _get_action_dist_from_latent(self, latent_pi):
        logits = self.action_net(latent_pi)
        logits = th.zeros_like(logits) if self.uniform_actions else logits / self.temperature
        return self.action_dist.proba_distribution(action_logits=logits)


class StandInPolicy(_TemperatureMixin, ActorCriticPolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_temperature()


class StandInLstmPolicy(_TemperatureMixin, RecurrentActorCriticPolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_temperature()


class _DeferMixin:
    """``train()`` makes no gradient step while ``updates_deferred``; counts calls."""

    def _init_defer(self) -> None:
        self.updates_deferred = False
        self.train_calls = 0
        self.gradient_updates = 0

    def train(self) -> None:
        self.train_calls += 1
        if self.updates_deferred:
            return
        self.gradient_updates += 1
        super().train()


class DeferPPO(_DeferMixin, PPO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_defer()


class DeferRecurrentPPO(_DeferMixin, RecurrentPPO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_defer()


class RolloutProbe(BaseCallback):
    """Records flags, temperature, action counts and parameters at each rollout boundary."""

    def __init__(self):
        super().__init__()
        self.starts: list[dict] = []
        self.ends: list[dict] = []

    def _params(self) -> np.ndarray:
        return th.nn.utils.parameters_to_vector(self.model.policy.parameters()).detach().clone()

    def _on_rollout_start(self) -> None:
        self.starts.append({"params": self._params(), "num_timesteps": self.model.num_timesteps})

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buf = self.model.rollout_buffer
        actions = buf.actions.reshape(-1).astype(np.int64)
        self.ends.append({
            "uniform": self.model.policy.uniform_actions,
            "deferred": self.model.updates_deferred,
            "temperature": self.model.policy.temperature,
            "counts": np.bincount(actions, minlength=N),
            "log_probs": buf.log_probs.reshape(-1).astype(np.float64),
            "num_timesteps": self.model.num_timesteps,
        })


def make_env(n_envs: int = 1, normalize: bool = True, **normalize_kwargs):
    # a callable, not the id: make_vec_env would pass render_mode, which the env rejects
    factory = functools.partial(gym.make, "LLMCluster-v0", **ENV_KWARGS)
    venv = make_vec_env(factory, n_envs=n_envs, seed=0)
    if normalize:
        venv = make_vec_normalize(venv, gamma=0.99, **normalize_kwargs)
    return venv


def make_ppo(venv, tmp_path, bias: float | None = None, cls=DeferPPO, policy=StandInPolicy,
             **kwargs):
    model = cls(policy, venv, n_steps=N_STEPS, batch_size=N_STEPS, n_epochs=1, seed=0,
                learning_rate=3e-3, policy_kwargs={"net_arch": [16]}, device="cpu", **kwargs)
    if bias is not None:  # a policy that routes nearly everything to replica 0
        with th.no_grad():
            model.policy.action_net.weight.zero_()
            model.policy.action_net.bias.copy_(th.tensor([bias] + [0.0] * (N - 1)))
    model.set_logger(configure(str(tmp_path), ["csv"]))
    return model


def read_progress(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "progress.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows, key) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key, "") != ""]


def obs_stats(rng, size=200) -> RunningMeanStd:
    venv = make_env(normalize=False)
    observations = [venv.reset()]
    for _ in range(size):
        observations.append(venv.step(rng.integers(0, N, size=1))[0])
    stats = RunningMeanStd(shape=observations[0].shape[1:])
    stats.update(np.concatenate(observations))
    return stats


def run_random_steps(venv, rng, steps: int) -> None:
    venv.reset()
    for _ in range(steps):
        venv.step(rng.integers(0, N, size=venv.num_envs))


# ------------------------------------------------------------------ normalize
def test_frozen_obs_stats_stay_fixed_while_reward_stats_update(rng):
    stats = obs_stats(rng)
    venv = make_env(obs_rms=stats, freeze_obs=True)
    assert isinstance(venv, VecNormalize) and obs_stats_frozen(venv)
    assert venv.obs_rms is not stats  # copied, not aliased
    mean, var, count = venv.obs_rms.mean.copy(), venv.obs_rms.var.copy(), venv.obs_rms.count
    ret_count = venv.ret_rms.count
    run_random_steps(venv, rng, 1000)
    np.testing.assert_array_equal(venv.obs_rms.mean, mean)
    np.testing.assert_array_equal(venv.obs_rms.var, var)
    assert venv.obs_rms.count == count
    assert venv.ret_rms.count == pytest.approx(ret_count + 1000)
    assert venv.ret_rms.var != 1.0
    np.testing.assert_array_equal(stats.mean, mean)  # the caller's statistics are untouched


def test_unfrozen_obs_stats_update(rng):
    stats = obs_stats(rng)
    venv = make_env(obs_rms=stats)
    assert not obs_stats_frozen(venv)
    run_random_steps(venv, rng, 1000)
    assert venv.obs_rms.count == pytest.approx(stats.count + 1001)  # reset + 1000 steps
    assert not np.allclose(venv.obs_rms.mean, stats.mean)
    assert venv.ret_rms.count == pytest.approx(1e-4 + 1000)


def test_save_load_keeps_values_and_frozen_flag(rng, tmp_path):
    venv = make_env(obs_rms=obs_stats(rng), freeze_obs=True)
    run_random_steps(venv, rng, 100)
    venv.save(str(tmp_path / "vecnormalize.pkl"))
    loaded = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), make_env(normalize=False))
    assert isinstance(loaded.obs_rms, FrozenRunningMeanStd) and loaded.obs_rms.frozen
    np.testing.assert_array_equal(loaded.obs_rms.mean, venv.obs_rms.mean)
    np.testing.assert_array_equal(loaded.obs_rms.var, venv.obs_rms.var)
    assert loaded.ret_rms.var == venv.ret_rms.var and loaded.ret_rms.count == venv.ret_rms.count
    mean = loaded.obs_rms.mean.copy()
    run_random_steps(loaded, rng, 100)  # still frozen after the round trip
    np.testing.assert_array_equal(loaded.obs_rms.mean, mean)
    freeze_obs_stats(loaded, False)
    loaded.save(str(tmp_path / "unfrozen.pkl"))
    again = VecNormalize.load(str(tmp_path / "unfrozen.pkl"), make_env(normalize=False))
    assert not again.obs_rms.frozen
    assert not again.obs_rms.copy().frozen and loaded.obs_rms.copy() is not loaded.obs_rms


def test_freeze_obs_stats_converts_a_stock_vec_normalize(rng):
    venv = VecNormalize(make_env(normalize=False), gamma=0.99)
    run_random_steps(venv, rng, 50)
    mean, var = venv.obs_rms.mean.copy(), venv.obs_rms.var.copy()
    freeze_obs_stats(venv, True)
    assert isinstance(venv.obs_rms, FrozenRunningMeanStd) and obs_stats_frozen(venv)
    np.testing.assert_array_equal(venv.obs_rms.var, var)
    run_random_steps(venv, rng, 50)
    np.testing.assert_array_equal(venv.obs_rms.mean, mean)
    freeze_obs_stats(venv, False)
    run_random_steps(venv, rng, 50)
    assert not np.array_equal(venv.obs_rms.mean, mean)


def test_make_vec_normalize_rejects_bad_arguments():
    bad = RunningMeanStd(shape=(3,))
    with pytest.raises(ValueError, match="obs_rms.mean.shape"):
        make_env(obs_rms=bad)
    with pytest.raises(ValueError, match="freeze_obs=True needs obs_rms"):
        make_env(freeze_obs=True)
    with pytest.raises(ValueError, match="gamma=1.5"):
        make_vec_normalize(make_env(normalize=False), gamma=1.5)


# -------------------------------------------------------------- stabilisation
def test_stabilization_random_routing_and_deferred_updates(rng, tmp_path):
    venv = make_env(obs_rms=obs_stats(rng), freeze_obs=True)
    frozen_mean = venv.obs_rms.mean.copy()
    model = make_ppo(venv, tmp_path, bias=5.0)
    probe = RolloutProbe()
    stabilization = NormalizerStabilization(2 * N_STEPS - 10, update_obs_stats=False)
    model.learn(4 * N_STEPS, callback=CallbackList([stabilization, probe]))

    # the threshold is rounded up to whole rollouts: the first two are random, the rest not
    assert [end["uniform"] for end in probe.ends] == [True, True, False, False]
    assert [end["deferred"] for end in probe.ends] == [True, True, False, False]
    random_counts = probe.ends[0]["counts"] + probe.ends[1]["counts"]
    np.testing.assert_allclose(random_counts / random_counts.sum(), 1 / N, atol=0.12)
    for end in probe.ends[2:]:  # the biased policy acts again (p(replica 0) ~ 0.98)
        assert end["counts"][0] / end["counts"].sum() > 0.8
    # no gradient step until the threshold, then updates resume
    initial = probe.starts[0]["params"]
    assert th.equal(probe.starts[1]["params"], initial)
    assert th.equal(probe.starts[2]["params"], initial)
    assert not th.equal(probe.starts[3]["params"], initial)
    assert (model.train_calls, model.gradient_updates) == (4, 2)
    # flags are restored when learn() returns; obs statistics stayed frozen, reward ones settled
    assert not model.policy.uniform_actions and not model.updates_deferred
    np.testing.assert_array_equal(venv.obs_rms.mean, frozen_mean)
    assert venv.ret_rms.count == pytest.approx(1e-4 + 4 * N_STEPS)
    done = column(read_progress(tmp_path), "stabilization/done")
    assert done == [1.0]


def test_stabilization_is_a_noop_after_resume_past_threshold(tmp_path):
    model = make_ppo(make_env(), tmp_path)
    model.learn(N_STEPS)
    model.updates_deferred = True  # as if restored from a checkpoint saved during stabilisation
    model.policy.uniform_actions = True
    probe = RolloutProbe()
    model.learn(N_STEPS, reset_num_timesteps=False,
                callback=CallbackList([NormalizerStabilization(N_STEPS, update_obs_stats=True), probe]))
    assert probe.ends[0]["uniform"] is False and probe.ends[0]["deferred"] is False
    assert model.gradient_updates == 2
    assert "stabilization/done" not in read_progress(tmp_path)[-1]


def test_stabilization_rejects_models_without_support(tmp_path):
    venv = make_env()
    stock = PPO("MlpPolicy", venv, n_steps=N_STEPS, device="cpu")
    with pytest.raises(TypeError, match="uniform_actions"):
        stock.learn(N_STEPS, callback=NormalizerStabilization(N_STEPS, update_obs_stats=True))
    no_defer = PPO(StandInPolicy, venv, n_steps=N_STEPS, device="cpu")
    with pytest.raises(TypeError, match="updates_deferred"):
        no_defer.learn(N_STEPS, callback=NormalizerStabilization(N_STEPS, update_obs_stats=True))
    unnormalised = make_ppo(make_env(normalize=False), tmp_path)
    with pytest.raises(ValueError, match="VecNormalize"):
        unnormalised.learn(N_STEPS, callback=NormalizerStabilization(N_STEPS, update_obs_stats=True))
    frozen = make_ppo(make_env(obs_rms=RunningMeanStd(shape=(46,)), freeze_obs=True), tmp_path)
    with pytest.raises(ValueError, match="update_obs_stats=True"):
        frozen.learn(N_STEPS, callback=NormalizerStabilization(N_STEPS, update_obs_stats=True))
    with pytest.raises(TypeError, match="temperature"):
        stock.learn(N_STEPS, callback=make_controller())


# ---------------------------------------------------------------- temperature
def _fixed_policy_run(tmp_path, bias, rollouts, **controller_kwargs):
    """Rollouts of a policy that never trains, so only the temperature changes."""
    model = make_ppo(make_env(), tmp_path, bias=bias)
    if bias is None:  # all logits zero: uniform at every temperature
        with th.no_grad():
            model.policy.action_net.weight.zero_()
            model.policy.action_net.bias.zero_()
    model.updates_deferred = True
    controller = make_controller(**controller_kwargs)
    probe = RolloutProbe()
    model.learn(rollouts * N_STEPS, callback=CallbackList([controller, probe]))
    return model, controller, probe


def test_temperature_rule_on_first_rollout(tmp_path):
    kwargs = {"adaptation_rate": 0.3, "ema_decay": 0.8, "target_balance": 0.9,
              "max_temperature": 4.0, "pulse_rollouts": 0}
    _, controller, probe = _fixed_policy_run(tmp_path, bias=2.0, rollouts=1, **kwargs)
    end = probe.ends[0]
    entropy = -end["log_probs"].mean()
    balance = balance_score(end["counts"])
    error = (0.5 * math.log(N) - entropy) / math.log(N) + (0.9 - balance)
    assert controller.entropy_ema == pytest.approx(entropy, rel=1e-6)
    assert controller.balance_ema == pytest.approx(balance, rel=1e-12)
    assert controller.temperature == pytest.approx(math.exp(0.3 * error), rel=1e-6)


def test_low_entropy_raises_temperature_up_to_the_bound(tmp_path):
    _, controller, probe = _fixed_policy_run(
        tmp_path, bias=5.0, rollouts=4, adaptation_rate=0.5, max_temperature=2.0,
        pulse_rollouts=0)
    used = [end["temperature"] for end in probe.ends]
    assert used[0] == 1.0 and all(b > a for a, b in zip(used, used[1:-1]))
    assert all(1.0 <= t <= 2.0 for t in used) and controller.temperature == 2.0
    rows = read_progress(tmp_path)
    assert column(rows, "temperature/value") == used
    assert all(e < 0.5 * math.log(N) for e in column(rows, "temperature/entropy_ema"))
    assert column(rows, "temperature/pulse") == [0.0] * 4


def test_high_entropy_lowers_temperature_down_to_the_bound(tmp_path):
    _, controller, probe = _fixed_policy_run(
        tmp_path, bias=None, rollouts=4, adaptation_rate=1.0, min_temperature=0.6,
        pulse_rollouts=0)
    used = [end["temperature"] for end in probe.ends]
    assert all(b < a for a, b in zip(used, used[1:-1])) and controller.temperature == 0.6
    assert controller.entropy_ema == pytest.approx(math.log(N), abs=1e-5)


def test_collapse_triggers_pulses_of_exact_length(tmp_path):
    _, controller, probe = _fixed_policy_run(
        tmp_path, bias=5.0, rollouts=7, adaptation_rate=0.05, pulse_temperature=4.0,
        pulse_rollouts=2, pulse_cooldown=1)
    pulse = [end["temperature"] == 4.0 for end in probe.ends]
    assert pulse == [False, True, True, False, False, True, True]
    rows = read_progress(tmp_path)
    assert column(rows, "temperature/pulse") == [float(p) for p in pulse]
    base = column(rows, "temperature/base")
    assert base[1] == base[0] and base[2] == base[0]  # no adaptation during a pulse
    assert controller.num_pulses == 2 and controller.cooldown_remaining == 1


def _synthetic_rollouts(rng, count):
    rollouts = []
    for _ in range(count):
        collapsed = rng.random() < 0.3
        p = np.array([0.85, 0.05, 0.05, 0.05]) if collapsed else np.full(N, 0.25)
        rollouts.append((float(rng.uniform(0.05, 1.3)), rng.multinomial(256, p)))
    return rollouts


def test_temperature_state_dict_round_trip(rng):
    kwargs = {"adaptation_rate": 0.2, "pulse_rollouts": 2, "pulse_cooldown": 1}
    original = make_controller(**kwargs)
    rollouts = _synthetic_rollouts(rng, 30)
    for entropy, counts in rollouts[:9]:
        original.update(entropy, counts)
    restored = make_controller(**kwargs)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    for entropy, counts in rollouts[9:]:
        assert restored.update(entropy, counts) == original.update(entropy, counts)
        assert restored.current_temperature == original.current_temperature
    assert restored.state_dict() == original.state_dict() and original.num_pulses >= 2
    with pytest.raises(KeyError, match="pulse_remaining"):
        restored.load_state_dict({"temperature": 1.0})
    with pytest.raises(ValueError, match="outside"):
        make_controller(max_temperature=1.5).load_state_dict(
            {**original.state_dict(), "temperature": 2.0})


def test_temperature_controller_validates_arguments():
    with pytest.raises(ValueError, match="initial_temperature=9"):
        make_controller(initial_temperature=9)
    with pytest.raises(ValueError, match="collapse_max_share=0.2"):
        make_controller(collapse_max_share=0.2).update(0.5, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="target_entropy=2"):
        make_controller(target_entropy=2).update(0.5, [1, 1, 1, 1])


# -------------------------------------------------------------------- monitor
def test_monitor_logs_shares_episodes_and_raw_rewards(tmp_path):
    venv = make_env(n_envs=2)  # episodes of 64 steps = one rollout per env
    model = make_ppo(venv, tmp_path, cls=PPO, policy="MlpPolicy")
    monitor = TrainingMonitor(warmup_rollouts=1)
    model.learn(2 * 2 * N_STEPS, callback=monitor)

    rows = read_progress(tmp_path)
    assert len(rows) == 2
    share_keys = [f"rollout/action_share_{i}" for i in range(N)]
    expected = share_keys + ["rollout/balance", "rollout/reward_mean", "reward_warmup/mean",
                             "reward_warmup/std"] + [f"episode/{k}" for k in EPISODE_METRICS]
    assert set(expected) <= set(rows[0])
    for row in rows:
        assert sum(float(row[k]) for k in share_keys) == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["reward_warmup/mean"] == ""  # only the first rollout is warm-up

    history = monitor.history_rows()
    assert [r["kind"] for r in history] == ["episode", "episode", "rollout"] * 2
    rollout_rows = monitor.history_rows("rollout")
    episode_rows = monitor.history_rows("episode")
    assert [r["num_timesteps"] for r in rollout_rows] == [128, 256]
    assert [r["num_timesteps"] for r in episode_rows] == [128, 128, 256, 256]
    assert float(rows[0]["rollout/reward_mean"]) == rollout_rows[0]["reward_mean"]
    # raw (not normalised) rewards: a rollout's reward sum is its two episodes' returns
    for i, rollout in enumerate(rollout_rows):
        returns = sum(e["reward_latency"] for e in episode_rows[2 * i: 2 * i + 2])
        assert rollout["reward_mean"] * rollout["steps"] == pytest.approx(returns, rel=1e-6)
    assert float(rows[1]["episode/e2e_mean"]) == pytest.approx(
        np.mean([e["e2e_mean"] for e in episode_rows[2:]]))

    path = monitor.write_csv(tmp_path / "history" / "curve.csv")
    with open(path, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 6 and list(written[0])[:2] == ["kind", "num_timesteps"]
    assert float(written[2]["balance"]) == rollout_rows[0]["balance"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["curve.csv"]

    resumed = TrainingMonitor(warmup_rollouts=1)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    model.learn(2 * N_STEPS, reset_num_timesteps=False, callback=resumed)
    assert resumed.history_rows()[:6] == history
    assert [r["rollout"] for r in resumed.history_rows("rollout")] == [1, 2, 3]
    assert resumed.history_rows("episode")[-1]["episode"] == 6


# ------------------------------------------------------------------ recurrent
def test_recurrent_run_with_all_callbacks(tmp_path):
    venv = make_env()
    model = DeferRecurrentPPO(
        StandInLstmPolicy, venv, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu",
        policy_kwargs={"net_arch": [16], "lstm_hidden_size": 16})
    model.set_logger(configure(str(tmp_path), ["csv"]))
    probe = RolloutProbe()
    controller = make_controller(initial_temperature=1.5, pulse_rollouts=0)
    callbacks = [NormalizerStabilization(32, update_obs_stats=True), controller, TrainingMonitor(), probe]
    model.learn(3 * 32, callback=CallbackList(callbacks))
    assert [end["uniform"] for end in probe.ends] == [True, False, False]
    assert [end["deferred"] for end in probe.ends] == [True, False, False]
    assert model.gradient_updates == 2
    # paused during stabilisation: the first adaptive rollout starts from the initial T
    assert probe.ends[1]["temperature"] == 1.5 and controller.num_rollouts == 2
    rows = read_progress(tmp_path)
    assert column(rows, "temperature/paused") == [1.0, 0.0, 0.0]
    assert column(rows, "stabilization/done") == [1.0]
    for row in rows:
        assert sum(float(row[f"rollout/action_share_{i}"]) for i in range(N)) == pytest.approx(1)


def test_callbacks_drive_the_project_policy(tmp_path):
    """The same contract with ``sb3_warmstart.policies.recurrent`` instead of the stand-in."""
    policies = pytest.importorskip("sb3_warmstart.policies.recurrent")
    model = make_ppo(make_env(), tmp_path, bias=5.0, policy=policies.TemperatureMlpPolicy)
    probe = RolloutProbe()
    controller = make_controller(initial_temperature=2.0, pulse_rollouts=0)
    model.learn(2 * N_STEPS, callback=CallbackList(
        [NormalizerStabilization(N_STEPS, update_obs_stats=True), controller, probe]))
    uniform, biased = probe.ends
    assert uniform["uniform"] and not biased["uniform"]
    np.testing.assert_allclose(uniform["log_probs"], -math.log(N), rtol=1e-6)
    assert biased["counts"][0] / biased["counts"].sum() > 0.6
    assert biased["temperature"] == 2.0 and model.policy.temperature == 2.0
    assert controller.temperature > 2.0  # low entropy and balance: T rises


# ------------------------------------------------------------------ TensorBoard hparams
def _tensorboard_events(folder):
    """``(scalar tags, [hparams of each session start])`` of the event files under ``folder``."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.plugins.hparams import plugin_data_pb2

    tags, sessions = set(), []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        try:
            contents = acc.PluginTagToContent("hparams")
        except KeyError:  # no hparams in this file
            contents = {}
        for content in contents.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                sessions.append({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                                 for k, v in data.session_start_info.hparams.items()})
    return tags, sessions


@pytest.mark.parametrize("lr_schedule", [False, True])
def test_tensorboard_has_hparams_once_and_no_duplicate_learning_rate(tmp_path, lr_schedule):
    from sb3_warmstart.algorithms.callbacks import HyperparameterLogger
    from sb3_warmstart.algorithms.ppo import KLPPO
    from sb3_warmstart.pipeline.config import (
        AdvancedOptimizationConfig,
        LearningRateScheduleConfig,
    )

    optimization = None
    if lr_schedule:
        optimization = AdvancedOptimizationConfig(learning_rate_schedule=LearningRateScheduleConfig(
            type="cosine_annealing_with_warmup"))
    model = KLPPO("MlpPolicy", make_env(normalize=False), n_steps=N_STEPS, batch_size=32,
                  n_epochs=1, seed=0, device="cpu", tensorboard_log=str(tmp_path),
                  kl_coef=0.2, entropy_min=0.5, optimization=optimization,
                  policy_kwargs={"net_arch": [8]})
    callback = HyperparameterLogger({"env": "LLMCluster-v0"})
    model.learn(2 * N_STEPS, callback=callback, tb_log_name="run")
    model.learn(N_STEPS, callback=callback, tb_log_name="run", reset_num_timesteps=False)
    tags, sessions = _tensorboard_events(tmp_path)
    assert "train/learning_rate" in tags and "train/lr" not in tags
    assert len(sessions) == 1  # the second learn() of the run writes no second session
    hparams = sessions[0]
    assert hparams["algorithm"] == "KLPPO" and hparams["env"] == "LLMCluster-v0"
    assert hparams["n_steps"] == N_STEPS and hparams["batch_size"] == 32
    assert hparams["gamma"] == pytest.approx(0.99)
    assert hparams["kl/kl_coef"] == pytest.approx(0.2)
    assert hparams["kl/entropy_min"] == pytest.approx(0.5)
    assert hparams["kl/kl_ref_coef_initial"] == 0.0  # not given: KLConfig.disabled()
    assert hparams["target_kl"] == "None"
