"""Rendering per Gymnasium's conventions: ``ansi`` text, ``human`` printing, ``None`` nothing,
anything else refused at construction by name."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import llm_cluster_env
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import ScenarioFamilyEnv

FAMILY = dict(family="generalist", replicas=[2, 4], replica_slots=6, episode_requests=20,
              capacity_requests=200)


def test_metadata_lists_the_supported_modes():
    for env_class in (LLMClusterEnv, ScenarioFamilyEnv):
        assert env_class.metadata["render_modes"] == ["ansi", "human"]
        assert env_class.metadata["render_fps"] > 0


def test_ansi_returns_a_summary_of_the_cluster():
    env = gym.make(llm_cluster_env.ENV_ID, render_mode="ansi", num_replicas=3,
                   episode_requests=20)
    env.reset(seed=0)
    for _ in range(5):
        env.step(1)
    text = env.render()
    lines = text.splitlines()
    assert isinstance(text, str) and "step 5/20" in lines[0] and "pending request 5" in lines[0]
    assert len(lines) == 2 + 3  # header, column names, one row per replica
    assert [int(line.split()[-1]) for line in lines[2:]] == [0, 5, 0]  # dispatched


def test_ansi_after_the_episode_ends():
    env = LLMClusterEnv(render_mode="ansi", episode_requests=4)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(0)
    assert "episode ended" in env.render().splitlines()[0]


def test_render_mode_none_renders_nothing(capsys):
    env = LLMClusterEnv(episode_requests=10)
    env.reset(seed=0)
    env.step(0)
    assert env.render() is None
    assert capsys.readouterr().out == ""


def test_human_prints_on_reset_and_step_and_returns_none(capsys):
    env = LLMClusterEnv(render_mode="human", num_replicas=2, episode_requests=10)
    env.reset(seed=0)
    first = capsys.readouterr().out
    assert "step 0/10" in first
    env.step(0)
    assert "step 1/10" in capsys.readouterr().out
    assert env.render() is None
    assert "step 1/10" in capsys.readouterr().out


def test_rendering_does_not_change_the_episode():
    rendered = LLMClusterEnv(render_mode="ansi", episode_requests=30)
    plain = LLMClusterEnv(episode_requests=30)
    a, _ = rendered.reset(seed=4)
    b, _ = plain.reset(seed=4)
    done = False
    while not done:
        rendered.render()
        a, ra, done, _, _ = rendered.step(1)
        b, rb, _, _, _ = plain.step(1)
        np.testing.assert_array_equal(a, b)
        assert ra == rb


@pytest.mark.parametrize("env_class, env_id", [(LLMClusterEnv, "LLMCluster-v0"),
                                               (ScenarioFamilyEnv, "LLMClusterFamily-v0")])
def test_unsupported_mode_is_refused_naming_it_and_the_supported_ones(env_class, env_id):
    with pytest.raises(TypeError) as err:
        env_class(render_mode="rgb_array")
    assert str(err.value) == (f"render_mode='rgb_array': {env_id} does not support it "
                              "(supported: None, 'ansi', 'human')")


def test_family_ansi_describes_the_scenario(capsys):
    env = gym.make(llm_cluster_env.FAMILY_ENV_ID, render_mode="ansi", **FAMILY)
    assert "no scenario yet" in env.unwrapped.render()
    _, info = env.reset(seed=1)
    text = env.render()
    assert text.splitlines()[0].startswith("scenario: family=")
    assert len(text.splitlines()) == 1 + 2 + info["scenario"]["replicas"]
    human = gym.make(llm_cluster_env.FAMILY_ENV_ID, render_mode="human", **FAMILY)
    human.reset(seed=1)
    assert capsys.readouterr().out.strip() == text


def test_gymnasium_checker_renders_every_declared_mode():
    from gymnasium.utils.env_checker import check_env

    check_env(gym.make(llm_cluster_env.ENV_ID, episode_requests=20).unwrapped)
