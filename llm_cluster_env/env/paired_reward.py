"""Paired-baseline rewards: the policy's step reward minus a baseline router's on the same step.

Each step of ``LLMCluster-v0`` rewards minus the latency integral of the *whole* cluster over
the step (request-seconds, :mod:`llm_cluster_env.env.reward`): every past decision and the
workload's own fluctuations contribute, so the part one decision is responsible for is buried
in noise. :class:`PairedBaselineReward` runs a *shadow* copy of each episode next to the real
one: at ``reset`` the shadow is an exact copy of the freshly reset simulator (same cluster,
same pre-drawn arrivals and lengths, same generator state: common random numbers), and at each
step the shadow routes its own pending request (the same request) with a fixed baseline router.
The reward becomes ``r_policy - r_baseline``.

* The optimum is unchanged: the shadow never sees the policy's actions (the workload of an
  episode is drawn once at ``reset``; the simulator itself draws nothing), so the subtracted
  term is a per-step baseline independent of the policy, and the paired return differs from the
  raw return by a quantity whose expectation does not depend on the policy.
* The shared noise cancels: a burst of arrivals or a run of long requests costs both copies
  alike.
* Both copies advance to the same next arrival at every step (one step = one arrival), so they
  integrate over the same interval; the last step drains both (each over its own remaining
  work), which is what makes the episode sums exact: the paired return is
  ``-(sum of the policy's E2E latencies - sum of the baseline's)`` in the latency term's units.

``info["raw_reward"]`` holds the policy's own reward and ``info["baseline_reward"]`` the
shadow's; episode metrics, action masks, ``view`` and ``layout`` are the main env's.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np

from llm_cluster_env.env.cluster_env import LLMClusterEnv

_MAX_SEED = 2**63 - 1


def served_env(env: gym.Env) -> LLMClusterEnv:
    """The :class:`LLMClusterEnv` that serves the current episode of ``env``: the env itself,
    or the current scenario's env of a ``ScenarioFamilyEnv`` (after ``reset``)."""
    base = env.unwrapped
    if isinstance(base, LLMClusterEnv):
        return base
    inner = getattr(base, "env", None)
    if isinstance(inner, LLMClusterEnv):
        return inner
    raise TypeError(f"PairedBaselineReward: {type(base).__name__} serves no LLMClusterEnv "
                    "(expected LLMCluster-v0 or LLMClusterFamily-v0, reset first)")


def shadow_copy(env: LLMClusterEnv) -> LLMClusterEnv:
    """An independent copy of ``env`` in its current state; the read-only parts (configs,
    iteration-time models, workload generator, output-length prior, layout) are shared rather
    than copied, everything that changes during an episode (cluster, requests, observation
    builder, reward totals, generator) is copied."""
    shared: list[Any] = [env.config, env.workload, env.output_prior, env.layout,
                         env.action_space, env.observation_space, env._action_mask]
    for replica in env.cluster.replicas:
        shared += [replica.config, replica.latency]
    memo = {id(obj): obj for obj in shared}
    return copy.deepcopy(env, memo)


class PairedBaselineReward(gym.Wrapper):
    """Rewards ``r_policy - r_baseline``, the baseline routing a shadow copy of each episode.

    :param env: ``LLMCluster-v0`` or ``LLMClusterFamily-v0`` (any wrappers around it).
    :param baseline: the baseline router: a name of
        :data:`llm_cluster_env.routing.registry.ALL_ROUTERS`, or a router instance (anything with
        ``reset(num_replicas, rng)`` and ``select(view)``; planners' ``bind(env)`` is called
        with the shadow).

    The baseline's generator is drawn from the shadow's copy of the episode generator, so an
    episode (``reset(seed=s)``) replays exactly; the main env's generators are never touched.
    ``shadow`` is the baseline's copy of the current (or just ended) episode, replaced at every
    ``reset``; its ``episode_metrics()`` are the baseline's on the same requests.
    """

    def __init__(self, env: gym.Env, baseline: Any) -> None:
        super().__init__(env)
        if isinstance(baseline, str):
            from llm_cluster_env.routing.registry import make_any_router  # routing imports env

            baseline = make_any_router(baseline)
        if not callable(getattr(baseline, "select", None)):
            raise TypeError(f"baseline: expected a router name or a router, got "
                            f"{type(baseline).__name__}")
        self.baseline = baseline
        self.shadow: LLMClusterEnv | None = None

    @property
    def baseline_name(self) -> str:
        """The baseline router's name (its class name when it has none)."""
        return str(getattr(self.baseline, "name", type(self.baseline).__name__))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        shadow = shadow_copy(served_env(self.env))
        shadow.render_mode = None
        shadow.observe_for(self.baseline)  # compute only what the baseline reads
        bind = getattr(self.baseline, "bind", None)  # planners simulate the env's workload
        if bind is not None:
            bind(shadow)
        rng = np.random.default_rng(int(shadow.np_random.integers(_MAX_SEED)))
        self.baseline.reset(shadow.num_replicas, rng)
        self.shadow = shadow
        return obs, info

    def step(self, action):
        shadow = self.shadow
        if shadow is None:
            raise RuntimeError("step() called before reset()")
        obs, reward, terminated, truncated, info = self.env.step(action)
        _, baseline_reward, b_terminated, b_truncated, _ = shadow.step(
            self.baseline.select(shadow.view))
        main = served_env(self.env)
        if (terminated, truncated) != (b_terminated, b_truncated) or (
                not terminated and main.cluster.now != shadow.cluster.now):
            raise RuntimeError(
                f"paired baseline out of step: main (terminated={terminated}, "
                f"truncated={truncated}, t={main.cluster.now!r} s) vs shadow "
                f"(terminated={b_terminated}, truncated={b_truncated}, "
                f"t={shadow.cluster.now!r} s); the shadow must serve the same arrivals")
        info["raw_reward"] = float(reward)
        info["baseline_reward"] = float(baseline_reward)
        return obs, float(reward) - float(baseline_reward), terminated, truncated, info

    # pass-through for routers, maskable learners and evaluation (gymnasium 1.x wrappers no
    # longer forward attributes)
    def action_masks(self) -> np.ndarray:
        """The main env's action mask (``MaskablePPO`` reads it)."""
        return self.env.unwrapped.action_masks()

    @property
    def view(self):
        """The main env's named view of its current observation."""
        return self.env.unwrapped.view

    @property
    def layout(self):
        """The main env's observation layout."""
        return self.env.unwrapped.layout


__all__ = ["PairedBaselineReward", "served_env", "shadow_copy"]
