"""Episode limits (``step_limit``: ``truncated=True``, no drain, reported by the spec) and the
vector-env loop of ``examples/vector_env_loop.py`` on gymnasium 0.29 and 1.x (``make test``
runs this module in both venvs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import llm_cluster_env  # noqa: F401
from llm_cluster_env import ConfigError
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.sim.request import RequestState

REPO_ROOT = Path(__file__).resolve().parents[1]


def _example():
    name = "example_vector_env_loop"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "examples" / "vector_env_loop.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(env, steps: int | None = None, seed: int = 0):
    """Round-robin actions until the episode ends (or ``steps``); the step tuples."""
    env.reset(seed=seed)
    out = []
    while steps is None or len(out) < steps:
        result = env.step(len(out) % 4)
        out.append(result)
        if result[2] or result[3]:
            break
    return out


def test_step_limit_truncates_without_draining():
    env = LLMClusterEnv(episode_requests=200, step_limit=50)
    steps = _run(env)
    assert len(steps) == 50
    obs, _, terminated, truncated, info = steps[-1]
    assert truncated and not terminated
    assert all(not (s[2] or s[3]) for s in steps[:-1])
    finished = len(info["requests"]["e2e_s"])
    assert 0 < finished < 50  # not drained: routed requests are still in the cluster
    assert info["requests_in_flight"] == 50 - finished
    assert info["requests_in_flight"] == sum(
        r.state != RequestState.FINISHED for r in env.cluster.requests[:50])
    assert info["metrics"]["e2e_mean"] == pytest.approx(np.mean(info["requests"]["e2e_s"]))
    # the observation is the state the episode continues from: the 51st request is pending
    assert env.pending_request.id == 50
    assert obs.shape == env.observation_space.shape
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(0)
    env.reset(seed=1)  # a new episode starts normally
    assert not any(s[2] or s[3] for s in [env.step(0)])


def test_step_limit_keeps_the_steps_before_it_identical():
    limited = _run(LLMClusterEnv(episode_requests=120, step_limit=60))
    full = _run(LLMClusterEnv(episode_requests=120))
    assert len(full) == 120 and full[-1][2] and not full[-1][3]
    for a, b in zip(limited, full[:60]):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]


@pytest.mark.parametrize("limit", [120, 500])
def test_step_limit_not_reached_changes_nothing(limit):
    limited = _run(LLMClusterEnv(episode_requests=120, step_limit=limit))
    full = _run(LLMClusterEnv(episode_requests=120))
    assert len(limited) == 120
    assert limited[-1][2] and not limited[-1][3]  # terminated (drained), not truncated
    assert [s[1] for s in limited] == [s[1] for s in full]
    assert limited[-1][4]["metrics"] == full[-1][4]["metrics"]
    assert "requests_in_flight" not in limited[-1][4]


def test_spec_reports_the_step_limit():
    assert gym.make("LLMCluster-v0", episode_requests=50).spec.max_episode_steps is None
    env = gym.make("LLMCluster-v0", episode_requests=50, step_limit=30)
    assert env.spec.max_episode_steps == 30
    assert env.unwrapped.spec.max_episode_steps == 30
    assert len(_run(env)) == 30 and _run(env)[-1][3]
    # gymnasium's own limit (TimeLimit) truncates the same way and wins when smaller
    env = gym.make("LLMCluster-v0", episode_requests=50, step_limit=30, max_episode_steps=20)
    assert env.spec.max_episode_steps == 20
    steps = _run(env)
    assert len(steps) == 20 and steps[-1][3] and not steps[-1][2]


def test_step_limit_is_validated():
    with pytest.raises(ConfigError, match=r"step_limit=0: must be >= 1"):
        LLMClusterEnv(step_limit=0)


def test_env_pickles_with_a_step_limit_mid_episode():
    import pickle

    env = LLMClusterEnv(episode_requests=100, step_limit=40)
    env.reset(seed=3)
    for _ in range(25):
        env.step(0)
    clone = pickle.loads(pickle.dumps(env))
    a = [env.step(1) for _ in range(15)]
    b = [clone.step(1) for _ in range(15)]
    assert a[-1][3] and b[-1][3]
    assert [s[1] for s in a] == [s[1] for s in b]


def _vector(num_envs: int, **kwargs):
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make("LLMCluster-v0", **kwargs) for _ in range(num_envs)])


def test_vector_loop_masks_autoreset_steps_and_returns_are_exact():
    example = _example()
    envs = _vector(2, episode_requests=40)
    layout = gym.make("LLMCluster-v0", episode_requests=40).unwrapped.layout
    rollout = example.collect(envs, 130, example.least_outstanding(layout))
    ended = rollout.episodes
    assert len(ended) == 6  # 3 per env whatever the autoreset mode
    for ep in ended:
        assert ep["terminated"] and not ep["truncated"] and ep["steps"] == 40
        # the return of the valid transitions is exactly minus the sum of E2E latencies
        assert ep["return"] == pytest.approx(-40 * ep["metrics"]["e2e_mean"], rel=1e-9)
    masked = ~rollout.valid
    if example.autoreset_on_next_step(envs):  # gymnasium 1.x: one masked step per reset
        assert masked.sum() == 6
        assert np.all(rollout.rewards[masked] == 0.0)
        assert not rollout.terminated[masked].any() and not rollout.truncated[masked].any()
    else:  # gymnasium 0.29: same-step autoreset, nothing to mask
        assert gym.__version__.startswith("0.") and masked.sum() == 0
    assert rollout.valid.sum() == 130 * 2 - masked.sum()
    envs.close()


def test_vector_loop_truncation_keeps_the_state_to_bootstrap_on():
    """At a truncation the loop's ``next_obs`` is the state the episode would continue from
    (not a reset observation), on 0.29 and 1.x alike: equal to a lone env's at its limit."""
    example = _example()
    envs = _vector(2, episode_requests=128, step_limit=30)
    layout = gym.make("LLMCluster-v0", episode_requests=128).unwrapped.layout
    policy = example.least_outstanding(layout)
    rollout = example.collect(envs, 62, policy, seed=7)
    first = [e for e in rollout.episodes if e["env"] == 0][0]
    assert first["truncated"] and not first["terminated"] and first["steps"] == 30
    t = int(np.flatnonzero(rollout.truncated[:, 0])[0])
    assert t == 29
    lone = gym.make("LLMCluster-v0", episode_requests=128, step_limit=30)
    obs, _ = lone.reset(seed=7)  # the vector env seeds sub-env 0 with the seed itself
    for _ in range(30):
        obs, _, _, truncated, _ = lone.step(policy(obs[None])[0])
    assert truncated
    np.testing.assert_array_equal(rollout.next_obs[t, 0], obs)
    assert first["metrics"]["e2e_mean"] > 0
    envs.close()


@pytest.mark.train
def test_sb3_vec_env_marks_step_limit_as_time_limit_truncation():
    """SB3 bootstraps a truncated episode's value from ``terminal_observation`` when
    ``TimeLimit.truncated`` is set: DummyVecEnv sets it from ``truncated``."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("LLMCluster-v0", n_envs=1, seed=0,
                        env_kwargs={"episode_requests": 100, "step_limit": 25})
    venv.reset()
    for step in range(25):
        _, _, dones, infos = venv.step(np.array([step % 4]))
    assert dones[0] and infos[0]["TimeLimit.truncated"]
    assert infos[0]["terminal_observation"].shape == venv.observation_space.shape
    assert infos[0]["episode"]["l"] == 25
