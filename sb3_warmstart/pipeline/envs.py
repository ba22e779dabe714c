"""Where training environments come from: one factory from a built config and a seed.

Every stage builds its environments here, from the :class:`~llm_cluster_env.config.EnvConfig`
resolved once by :class:`~sb3_warmstart.pipeline.config.TrainingConfig`, so replacing the training
environment (e.g. by a sampler over a family of scenarios) touches this module only.

* :class:`EpisodeSeedWrapper` gives every episode an explicit seed from a ``SeedSequence`` and
  reports it in the final step's ``info["episode_seed"]``, so any training episode can be
  replayed (the report runs ``lor`` on exactly the arrivals each training episode saw).
* :func:`make_base_env` builds the simulator from the config: the one place an environment is
  made (demonstrations wrap it for imitation, PPO for SB3): one scenario
  (``LLMCluster-v0``), or a scenario family that draws a new cluster and workload every
  episode (``LLMClusterFamily-v0``, :mod:`llm_cluster_env.env.family`).
* :func:`make_env` wraps it for training; :func:`make_training_venv` builds the PPO's
  ``VecNormalize(DummyVecEnv)``. With ``ppo.paired_baseline`` set, each training env's reward
  is paired with that router on a shadow copy of the episode
  (:class:`~llm_cluster_env.env.paired_reward.PairedBaselineReward`): the policy's step reward
  minus the router's over the same step, the raw one kept in ``info["raw_reward"]``. Monitor's
  episode returns (``rollout/ep_rew_mean``) and the reward normaliser then see the paired
  reward; episode metrics stay the policy's own. Evaluation envs are never paired.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from llm_cluster_env.config import EnvConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import (
    ScenarioFamilyConfig,
    ScenarioFamilyEnv,
    SharedCache,
    family_layout,
)
from llm_cluster_env.env.observation import ObservationLayout
from llm_cluster_env.env.paired_reward import PairedBaselineReward
from sb3_warmstart.common.normalize import make_vec_normalize

if TYPE_CHECKING:
    from sb3_warmstart.pipeline.config import TrainingConfig

_MAX_SEED = 2**63 - 1
#: ``spawn_key`` of the training environments' episode seeds (demos use other streams).
TRAINING_STREAM = 7


class EpisodeSeedWrapper(gym.Wrapper):
    """Gives every episode an explicit seed and reports it in the final step's ``info``.

    ``reset()`` without a seed (as a VecEnv auto-reset does) draws the episode's seed from
    ``seed_sequence``; ``reset(seed=s)`` uses ``s``. The final step's ``info["episode_seed"]``
    holds it, so any episode can be replayed with ``env.reset(seed=episode_seed)``.

    :param env: the environment.
    :param seed_sequence: source of the episode seeds.
    """

    def __init__(self, env: gym.Env, seed_sequence: np.random.SeedSequence) -> None:
        super().__init__(env)
        self._seeds = np.random.default_rng(seed_sequence)
        self.episode_seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed = int(self._seeds.integers(_MAX_SEED))
        self.episode_seed = int(seed)
        obs, info = self.env.reset(seed=self.episode_seed, options=options)
        info["episode_seed"] = self.episode_seed
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info["episode_seed"] = self.episode_seed
        return obs, reward, terminated, truncated, info


def training_seed_sequence(seed: int, rank: int) -> np.random.SeedSequence:
    """The source of the episode seeds of training environment ``rank`` of a run seeded
    ``seed`` (independent of the demonstrations' and the evaluation's seeds)."""
    return np.random.SeedSequence(seed, spawn_key=(TRAINING_STREAM, rank))


TrainingEnvSpec = EnvConfig | ScenarioFamilyConfig


def training_env_spec(config: TrainingConfig) -> TrainingEnvSpec:
    """What the run trains on: its scenario family, or its one scenario."""
    return config.family_config if config.family_config is not None else config.env


def make_base_env(spec: TrainingEnvSpec, shared_cache: dict | None = None) -> gym.Env:
    """The environment ``spec`` describes, before any wrapper: ``LLMCluster-v0`` for one
    scenario, ``LLMClusterFamily-v0`` (a new scenario every episode) for a family.
    ``shared_cache`` shares read-only parts between environments of one process."""
    if isinstance(spec, ScenarioFamilyConfig):
        return ScenarioFamilyEnv(spec, shared_cache=shared_cache)
    return LLMClusterEnv(config=spec, shared_cache=shared_cache)


def training_layout(spec: TrainingEnvSpec) -> ObservationLayout:
    """The observation layout of every training episode (a family's episodes share one)."""
    if isinstance(spec, ScenarioFamilyConfig):
        return family_layout(spec)
    return LLMClusterEnv(config=spec).layout


def make_env(spec: TrainingEnvSpec, seed_sequence: np.random.SeedSequence,
             shared_cache: dict | None = None, *, paired_baseline: str | None) -> gym.Env:
    """One training environment: :func:`make_base_env`, every episode seeded from
    ``seed_sequence``, with rewards paired with the router ``paired_baseline`` when given
    (:class:`~llm_cluster_env.env.paired_reward.PairedBaselineReward`), inside SB3's
    ``Monitor`` (episode returns, of the paired reward when paired, and lengths)."""
    env: gym.Env = EpisodeSeedWrapper(make_base_env(spec, shared_cache), seed_sequence)
    if paired_baseline is not None:
        env = PairedBaselineReward(env, paired_baseline)
    return Monitor(env)


def make_training_venv(spec: TrainingEnvSpec, *, seed: int, n_envs: int, gamma: float,
                       norm_reward: bool, norm_obs: bool = True,
                       obs_rms: RunningMeanStd | None = None,
                       freeze_obs: bool = False, paired_baseline: str | None
                       ) -> VecNormalize:
    """PPO's environments: ``n_envs`` of :func:`make_env` in a ``DummyVecEnv`` (checkpoints
    pickle them; they share one cache of read-only env parts), wrapped in
    :func:`~sb3_warmstart.common.normalize.make_vec_normalize`.

    :param spec: the training environment (:func:`training_env_spec`).
    :param seed: the run's seed. :param n_envs: parallel environments.
    :param gamma: discount of the reward normaliser. :param norm_reward: normalise rewards.
    :param norm_obs: normalise observations (False for the replica-set policies, which scale
        their inputs themselves). :param obs_rms: initial observation statistics (from
        behaviour cloning). :param freeze_obs: keep them fixed.
    :param paired_baseline: pair every env's reward with this router (``ppo.paired_baseline``;
        see :func:`make_env`); the normaliser then scales the paired reward.
    """
    cache = SharedCache()
    venv = DummyVecEnv([functools.partial(make_env, spec, training_seed_sequence(seed, rank),
                                          cache, paired_baseline=paired_baseline)
                        for rank in range(n_envs)])
    return make_vec_normalize(venv, gamma=gamma, obs_rms=obs_rms, freeze_obs=freeze_obs,
                              norm_reward=norm_reward, norm_obs=norm_obs)
