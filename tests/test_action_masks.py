"""Action masks for empty replica slots: ``action_masks()``, ``info["action_mask"]``, the
``k % N`` fallback for an empty slot, both env checkers, and ``MaskablePPO`` on the family env."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import llm_cluster_env
from llm_cluster_env.env.cluster_env import LLMClusterEnv

FAMILY = dict(family="generalist", replicas=[2, 5], replica_slots=8, episode_requests=48,
              capacity_requests=200)
#: A fixed 3-replica cluster padded to 6 slots.
PADDED = dict(episode_requests=40, observation={"replica_slots": 6})


def _family(**kwargs):
    return gym.make(llm_cluster_env.FAMILY_ENV_ID, **{**FAMILY, **kwargs})


def test_mask_marks_the_replicas_of_a_padded_env():
    env = LLMClusterEnv(num_replicas=3, **PADDED)
    _, info = env.reset(seed=0)
    mask = env.action_masks()
    assert env.action_space.n == 6
    assert mask.dtype == np.bool_ and mask.tolist() == [True] * 3 + [False] * 3
    assert info["action_mask"] is mask and not mask.flags.writeable
    _, _, _, _, info = env.step(1)
    assert info["action_mask"].tolist() == mask.tolist() and info["invalid_action"] is False


def test_unpadded_env_masks_nothing_and_keeps_step_infos_empty():
    env = LLMClusterEnv(episode_requests=20)
    _, info = env.reset(seed=0)
    assert info["action_mask"].all() and info["action_mask"].size == env.num_replicas
    _, _, _, _, info = env.step(0)
    assert info == {}


@pytest.mark.parametrize("empty_slot", [3, 4, 5])
def test_empty_slot_routes_to_slot_mod_n_and_is_flagged(empty_slot):
    """An empty slot ``k`` behaves exactly like action ``k % N`` (same observations and
    rewards), with ``invalid_action`` set; valid actions are untouched."""
    a = LLMClusterEnv(num_replicas=3, **PADDED)
    b = LLMClusterEnv(num_replicas=3, **PADDED)
    obs_a, _ = a.reset(seed=3)
    obs_b, _ = b.reset(seed=3)
    rng = np.random.default_rng(0)
    flags, done = [], False
    while not done:
        valid = int(rng.integers(3))
        obs_a, rew_a, done, _, info_a = a.step(valid)
        use_empty = valid == empty_slot % 3 and rng.random() < 0.7
        obs_b, rew_b, _, _, info_b = b.step(empty_slot if use_empty else valid)
        np.testing.assert_array_equal(obs_a, obs_b)
        assert rew_a == rew_b
        assert info_a["invalid_action"] is False
        assert info_b["invalid_action"] is use_empty
        flags.append(use_empty)
    assert any(flags) and not all(flags)
    assert a.dispatch_counts == b.dispatch_counts
    assert a.episode_metrics() == b.episode_metrics()


@pytest.mark.parametrize("action", [6, -1, 1.0, "0", True])
def test_actions_outside_the_space_are_still_refused(action):
    env = LLMClusterEnv(num_replicas=3, **PADDED)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action=.*\[0, 5\]"):
        env.step(action)


def test_family_masks_follow_each_drawn_cluster():
    env = _family()
    sizes = set()
    for seed in range(5):
        _, info = env.reset(seed=seed)
        n = env.unwrapped.num_replicas
        sizes.add(n)
        expected = [True] * n + [False] * (8 - n)
        assert env.unwrapped.action_masks().tolist() == expected
        assert info["action_mask"].tolist() == expected
        _, _, _, _, info = env.step(n - 1)
        assert info["action_mask"].tolist() == expected and info["invalid_action"] is False
        _, _, _, _, info = env.step(7)
        assert info["invalid_action"] is (n < 8)
    assert len(sizes) > 1


def test_family_mask_before_reset_is_an_error():
    with pytest.raises(RuntimeError, match="reset"):
        _family().unwrapped.action_masks()


def test_family_env_passes_gymnasium_check_env():
    """gymnasium's checker (0.29 here; 1.x in .venv-gym1 via ``make test-gym1``) samples
    random actions from the whole ``Discrete(slots)`` space, empty slots included."""
    env = _family()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    messages = [str(w.message) for w in caught]
    # the only remark: observations are unbounded above (Box(0, inf)), on purpose
    assert all("infinity" in m for m in messages), messages


def test_padded_cluster_env_passes_gymnasium_check_env():
    check_env(gym.make(llm_cluster_env.ENV_ID, num_replicas=3, **PADDED).unwrapped)


@pytest.mark.train
def test_family_env_passes_sb3_check_env():
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_checker.check_env(_family().unwrapped, warn=True)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.train
@pytest.mark.slow
def test_maskable_ppo_trains_on_the_family_env_and_never_picks_an_empty_slot():
    torch = pytest.importorskip("torch")
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)

    class Count(BaseCallback):
        def __init__(self):
            super().__init__()
            self.steps = self.invalid = self.masked_steps = 0

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                self.steps += 1
                self.invalid += bool(info["invalid_action"])
                self.masked_steps += not info["action_mask"].all()
            return True

    venv = make_vec_env(llm_cluster_env.FAMILY_ENV_ID, n_envs=2, seed=0, env_kwargs=FAMILY)
    model = sb3_contrib.MaskablePPO("MlpPolicy", venv, n_steps=256, batch_size=128, n_epochs=2,
                                    seed=0, device="cpu")
    counter = Count()
    model.learn(total_timesteps=2048, callback=counter)
    assert model.num_timesteps >= 2048 and counter.steps == model.num_timesteps
    assert counter.masked_steps > 0.3 * counter.steps  # most draws leave slots empty
    assert counter.invalid == 0
    assert np.isfinite(model.logger.name_to_value.get("train/loss", 0.0))
