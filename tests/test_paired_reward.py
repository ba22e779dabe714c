"""Paired-baseline rewards (``llm_cluster_env.env.paired_reward``) and their use in training.

The paired reward is the policy's step reward minus a baseline router's on a shadow copy of
the episode: zero when the policy is the baseline, equal clocks at every step, the same
requests in both copies, the main env's trajectory and metrics untouched, and it pickles and
runs inside the training pipeline's ``VecNormalize``.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import ScenarioFamilyEnv
from llm_cluster_env.env.paired_reward import PairedBaselineReward, served_env, shadow_copy
from llm_cluster_env.routing.registry import make_any_router

REQUESTS = 96


def single_env() -> LLMClusterEnv:
    return LLMClusterEnv(episode_requests=REQUESTS)


def family_env() -> ScenarioFamilyEnv:
    return ScenarioFamilyEnv("generalist", episode_requests=REQUESTS, replicas=(2, 6))


def drive(env, router_name: str, seed: int, *, on_step=None) -> list[tuple[float, dict]]:
    """One episode of ``env`` (reset with ``seed``) routed by ``router_name``; the
    ``(reward, info)`` of every step. The router draws (ties) from the generator the wrapper
    gives its baseline (drawn from the episode generator the shadow copied at reset)."""
    env.reset(seed=seed)
    router = make_any_router(router_name)
    episode_rng = copy.deepcopy(served_env(env).np_random)
    router.reset(served_env(env).num_replicas,
                 np.random.default_rng(int(episode_rng.integers(2**63 - 1))))
    steps, done = [], False
    while not done:
        _, reward, terminated, truncated, info = env.step(router.select(env.view))
        steps.append((reward, info))
        done = terminated or truncated
        if on_step is not None and not done:
            on_step(env)
    return steps


@pytest.mark.parametrize("make", [single_env, family_env], ids=["single", "family"])
@pytest.mark.parametrize("router", ["least_added_time", "lor"])
def test_baseline_equal_to_the_policy_pairs_to_exactly_zero(make, router):
    steps = drive(PairedBaselineReward(make(), router), router, seed=3)
    assert len(steps) == REQUESTS
    assert all(reward == 0.0 for reward, _ in steps)
    assert all(info["raw_reward"] == info["baseline_reward"] for _, info in steps)
    assert any(info["raw_reward"] != 0.0 for _, info in steps)


@pytest.mark.parametrize("make", [single_env, family_env], ids=["single", "family"])
def test_both_copies_serve_the_same_requests_on_the_same_clock(make):
    env = PairedBaselineReward(make(), "least_added_time")
    clocks = []

    def same_clock(env):
        main, shadow = served_env(env), env.shadow
        assert main.cluster.now == shadow.cluster.now
        assert main.pending_request.id == shadow.pending_request.id
        clocks.append(main.cluster.now)

    steps = drive(env, "lor", seed=5, on_step=same_clock)
    assert len(clocks) == REQUESTS - 1 and clocks == sorted(clocks)
    main, shadow = served_env(env).request_records(), env.shadow.request_records()
    for column in ("request_id", "arrival_s", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(main[column], shadow[column])
    assert not np.array_equal(main["replica"], shadow["replica"])  # routed differently
    # the paired return is minus the policy's summed E2E plus the baseline's (latency term)
    scale = served_env(env).config.reward.scale
    raw = sum(info["raw_reward"] for _, info in steps)
    base = sum(info["baseline_reward"] for _, info in steps)
    paired = sum(reward for reward, _ in steps)
    assert raw == pytest.approx(-scale * main["e2e_s"].sum(), rel=1e-9)
    assert base == pytest.approx(-scale * shadow["e2e_s"].sum(), rel=1e-9)
    assert paired == pytest.approx(raw - base, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("make", [single_env, family_env], ids=["single", "family"])
def test_the_main_env_is_untouched(make):
    """Observations, raw rewards, masks and metrics are those of the unwrapped env."""
    paired = PairedBaselineReward(make(), "least_added_time")
    plain = make()
    obs_p, info_p = paired.reset(seed=11)
    obs, info = plain.reset(seed=11)
    np.testing.assert_array_equal(obs_p, obs)
    np.testing.assert_array_equal(paired.action_masks(), plain.action_masks())
    assert paired.layout.names == plain.layout.names
    router = make_any_router("lor")
    router.reset(served_env(plain).num_replicas, np.random.default_rng(0))
    done = False
    while not done:
        action = router.select(plain.view)
        np.testing.assert_array_equal(paired.view.queued, plain.view.queued)
        obs_p, r_p, term_p, trunc_p, info_p = paired.step(action)
        obs, r, term, trunc, info = plain.step(action)
        np.testing.assert_array_equal(obs_p, obs)
        assert info_p["raw_reward"] == r and (term_p, trunc_p) == (term, trunc)
        done = term
    assert info_p["metrics"] == info["metrics"]
    assert info_p["metrics"] != paired.shadow.episode_metrics()


def test_shadow_copy_is_independent_and_shares_only_read_only_parts():
    env = single_env()
    env.reset(seed=2)
    shadow = shadow_copy(env)
    assert shadow.cluster is not env.cluster and shadow.builder is not env.builder
    assert shadow.cluster.replicas[0] is not env.cluster.replicas[0]
    assert shadow.cluster.replicas[0].latency is env.cluster.replicas[0].latency
    assert shadow.workload is env.workload and shadow.config is env.config
    shadow.step(0)
    assert env._steps == 0 and env.cluster.now < shadow.cluster.now


def test_pickles_mid_episode_and_continues_identically():
    env = PairedBaselineReward(family_env(), "least_added_time")
    env.reset(seed=7)
    for action in (0, 1, 0):
        env.step(action)
    clone = pickle.loads(pickle.dumps(env))
    for action in (1, 1, 0, 1):
        a, b = env.step(action), clone.step(action)
        assert a[1] == b[1] and a[4]["baseline_reward"] == b[4]["baseline_reward"]


def test_refusals():
    with pytest.raises(ValueError, match="no_such_router"):
        PairedBaselineReward(single_env(), "no_such_router")
    with pytest.raises(TypeError, match="router"):
        PairedBaselineReward(single_env(), 3)
    with pytest.raises(RuntimeError, match="reset"):
        PairedBaselineReward(single_env(), "lor").step(0)


def test_training_venv_pairs_rewards_under_vecnormalize():
    pytest.importorskip("stable_baselines3")  # the env-only install has no training stack
    from sb3_warmstart.pipeline.config import TrainingConfig
    from sb3_warmstart.pipeline.envs import make_training_venv, training_env_spec

    config = TrainingConfig().with_overrides({
        "family_overrides": {"episode_requests": 32, "replicas": [2, 4]},
        "ppo": {"paired_baseline": "least_added_time", "n_envs": 2}})
    spec = training_env_spec(config)
    venv = make_training_venv(spec, seed=0, n_envs=2, gamma=0.99, norm_reward=True,
                              norm_obs=False, paired_baseline=config.ppo.paired_baseline)
    plain = make_training_venv(spec, seed=0, n_envs=2, gamma=0.99, norm_reward=True,
                               norm_obs=False, paired_baseline=None)
    assert isinstance(venv.venv.envs[0].env, PairedBaselineReward)
    assert not isinstance(plain.venv.envs[0].env, PairedBaselineReward)
    venv.reset()
    plain.reset()
    episodes = 0
    for _ in range(40):
        masks = np.stack(venv.env_method("action_masks"))
        actions = masks.argmax(axis=1)
        _, rewards, dones, infos = venv.step(actions)
        _, _, _, plain_infos = plain.step(actions)
        assert np.isfinite(rewards).all()
        original = venv.get_original_reward()
        for i, info in enumerate(infos):
            assert original[i] == pytest.approx(info["raw_reward"] - info["baseline_reward"])
            if "metrics" in info:  # the policy's own metrics, as without pairing
                assert info["metrics"] == plain_infos[i]["metrics"]
                assert info["episode"]["r"] != pytest.approx(
                    plain_infos[i]["episode"]["r"], abs=1e-6)
                episodes += 1
    assert episodes == 2
    assert pickle.loads(pickle.dumps(venv.venv.envs[0])).env.baseline_name == "least_added_time"


def test_the_env_package_stays_free_of_the_training_stack():
    code = ("import sys, llm_cluster_env.env.paired_reward as p; "
            "p.PairedBaselineReward(p.LLMClusterEnv(episode_requests=8), 'least_added_time')"
            ".reset(seed=0); "
            "print(sorted(m for m in ('torch', 'stable_baselines3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_ppo_session_trains_on_paired_rewards_without_the_clones_return_statistics():
    """``ppo.paired_baseline`` pairs the session's training envs; the clone's return
    statistics (of the raw reward) are copied only without pairing."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.running_mean_std import RunningMeanStd

    from sb3_warmstart.common.normalize import ReturnNormalizer
    from sb3_warmstart.pipeline.config import TrainingConfig
    from sb3_warmstart.pipeline.ppo_stage import build_session
    from sb3_warmstart.pipeline.warm_start_stage import Pretrained

    base = TrainingConfig().with_overrides({
        "family_overrides": {"episode_requests": 32, "replicas": [2, 4]},
        "ppo": {"n_envs": 1}})
    cold = build_session(base, None)
    stats = RunningMeanStd(shape=())
    stats.mean, stats.var, stats.count = np.array(0.0), np.array(400.0), 1e4
    pretrained = Pretrained(cold.model.policy, None, ReturnNormalizer(stats, 0.99), "test", {})
    sessions = {name: build_session(base.with_overrides({"ppo": {"paired_baseline": name}}),
                                    pretrained)
                for name in (None, "least_added_time")}
    plain, paired = (sessions[n].venv for n in (None, "least_added_time"))
    assert isinstance(paired.venv.envs[0].env, PairedBaselineReward)
    assert not isinstance(plain.venv.envs[0].env, PairedBaselineReward)
    assert float(plain.ret_rms.var) == 400.0
    assert float(paired.ret_rms.var) == 1.0  # fresh: set by the stabilisation rollouts
