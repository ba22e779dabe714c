"""Collecting heuristic demonstrations with ``imitation``'s rollouts.

A heuristic router (:mod:`llm_cluster_env.routing.heuristics`) drives ``LLMCluster-v0`` through
:func:`imitation.data.rollout.generate_trajectories`. :class:`HeuristicPolicy` decides from
``layout.view(obs)``, i.e. from exactly the observation vector an agent sees, so demonstrations,
behaviour cloning and PPO share one state builder. Trajectories are imitation's own
:class:`~imitation.data.types.TrajectoryWithRew`.

:func:`collect_demonstrations` executes a
:class:`~sb3_warmstart.warmstart.demo_plan.CollectionPlan`: each run gets its own ``DummyVecEnv`` of
``RolloutInfoWrapper(EpisodeSeedWrapper(make_base_env(run.env_config)))`` and one
``generate_trajectories(..., make_min_timesteps(steps))`` call. imitation only returns complete
episodes, so a run yields a whole number of episodes of ``episode_requests`` steps (fewer only
with ``oversize_policy="reject"``); it overshoots its planned steps by less than one episode;
with several envs, episodes that finish together past the target are dropped (imitation
shuffles first, so the kept ones are a random subset). Stats report planned and actual counts.

Seeds: everything derives from ``seed`` through
:meth:`~sb3_warmstart.warmstart.demo_plan.CollectionRun.seed_sequence`: every episode of every
env gets its own explicit seed (recorded in the stats and in the trajectory's last ``info``),
routers draw from their own streams, and imitation's shuffle from another. Two calls with the
same arguments return identical trajectories.

Each trajectory's ``infos`` is reduced to ``{}`` per step except the last one, which holds
``{"metrics": <episode metrics>, "episode_seed": <int>}``; ``obs`` and ``rews`` are the
unwrapped ones of ``RolloutInfoWrapper`` (float32 observations as the env returns them,
float64 rewards), as in :func:`imitation.data.rollout.rollout`. Storage:
:mod:`sb3_warmstart.warmstart.demo_store`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

import llm_cluster_env
from llm_cluster_env.config import EnvConfig
from llm_cluster_env.env.observation import ObservationLayout
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import balance_score
from llm_cluster_env.validation import to_dict
from sb3_warmstart.pipeline.envs import EpisodeSeedWrapper, make_base_env
from sb3_warmstart.warmstart.demo_plan import (
    ENV_STREAM,
    ROUTER_STREAM,
    SHUFFLE_STREAM,
    ImbalanceSpec,
    plan_collection,
)
from sb3_warmstart.warmstart.demo_store import FORMAT


class HeuristicPolicy:
    """A heuristic router as an imitation ``PolicyCallable`` over a VecEnv batch.

    ``policy(obs, state, episode_start) -> (actions, state)``: one router per sub-env decides
    from ``layout.view(obs[i])``. A sub-env's router is reset (with a fresh generator from that
    env's seed stream) when ``episode_start[i]`` is true, and every router is reset when
    ``state is None`` (the first call of a rollout, as in SB3's ``predict``): pass the returned
    state back on the next call.

    :param router: router name from :data:`llm_cluster_env.routing.heuristics.ROUTERS`.
    :param layout: the env's observation layout (``env.unwrapped.layout``).
    :param num_envs: number of sub-envs in the batch.
    :param seed: root of the routers' randomness (an int >= 0 or a ``SeedSequence``); env ``i``
        uses child ``i``, and each of its episodes a fresh grandchild.
    :param router_kwargs: keyword arguments of the router's constructor (e.g. ``llm_d``
        weights).
    """

    def __init__(self, router: str, layout: ObservationLayout, num_envs: int = 1, *,
                 seed: int | np.random.SeedSequence = 0,
                 router_kwargs: Mapping[str, Any] | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}: must be >= 1")
        self.router_name = router
        self.layout = layout
        self.num_envs = num_envs
        self.routers = [make_router(router, **dict(router_kwargs or {})) for _ in range(num_envs)]
        root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        self._env_seeds = root.spawn(num_envs)
        self.episodes_started = np.zeros(num_envs, dtype=np.int64)

    def __call__(self, observations: np.ndarray, states: tuple[np.ndarray, ...] | None = None,
                 episode_starts: np.ndarray | None = None
                 ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        obs = np.asarray(observations)
        if obs.shape != (self.num_envs, self.layout.size):
            raise ValueError(f"observations.shape={obs.shape}: expected ({self.num_envs}, "
                             f"{self.layout.size}) for {self.num_envs} envs of this layout")
        if states is None or episode_starts is None:
            starts = np.ones(self.num_envs, dtype=bool)
        else:
            starts = np.asarray(episode_starts, dtype=bool)
        actions = np.empty(self.num_envs, dtype=np.int64)
        view = self.layout.view
        for i, router in enumerate(self.routers):
            if starts[i]:
                rng = np.random.default_rng(self._env_seeds[i].spawn(1)[0])
                router.reset(self.layout.num_replicas, rng)
                self.episodes_started[i] += 1
            actions[i] = router.select(view(obs[i]))
        return actions, (self.episodes_started.copy(),)

    def __repr__(self) -> str:
        return f"HeuristicPolicy(router={self.router_name!r}, num_envs={self.num_envs})"


class _ProgressPolicy:
    """Reports the steps taken to a :class:`~sb3_warmstart.pipeline.progress.ProgressPrinter`
    on every call of the wrapped policy."""

    def __init__(self, policy: HeuristicPolicy, printer: Any, done: int) -> None:
        self.policy = policy
        self.printer = printer
        self.done = done

    def __call__(self, observations, states=None, episode_starts=None):
        out = self.policy(observations, states, episode_starts)
        self.done += len(observations)
        self.printer.update(self.done)
        return out


def make_demo_venv(env_config: EnvConfig, seed_sequences: Sequence[np.random.SeedSequence]):
    """``DummyVecEnv`` of ``RolloutInfoWrapper(EpisodeSeedWrapper(make_base_env(...)))``, one
    sub-env per seed sequence (the source of that sub-env's episode seeds), all from ``env_config``."""
    from imitation.data.wrappers import RolloutInfoWrapper
    from stable_baselines3.common.vec_env import DummyVecEnv

    return DummyVecEnv([functools.partial(_make_demo_env, RolloutInfoWrapper, env_config, seq)
                        for seq in seed_sequences])


def _make_demo_env(rollout_wrapper: type, env_config: EnvConfig,
                   seed_sequence: np.random.SeedSequence) -> gym.Env:
    return rollout_wrapper(EpisodeSeedWrapper(make_base_env(env_config), seed_sequence))


def _clean_trajectory(traj):
    """imitation's ``unwrap_traj`` (original obs and float64 rewards), then infos reduced to
    the final step's episode metrics and seed."""
    from imitation.data import rollout

    traj = rollout.unwrap_traj(traj)
    final = traj.infos[-1]
    infos = np.empty(len(traj.acts), dtype=object)
    for t in range(len(infos) - 1):
        infos[t] = {}
    infos[-1] = {"metrics": {k: float(v) for k, v in final["metrics"].items()},
                 "episode_seed": int(final["episode_seed"])}
    return dataclasses.replace(traj, infos=infos)


def _run_stats(trajs: Sequence, num_replicas: int) -> dict[str, Any]:
    """Steps, episodes, action distribution, balance, mean return and E2E of trajectories."""
    acts = np.concatenate([t.acts for t in trajs]) if trajs else np.zeros(0, dtype=np.int64)
    counts = np.bincount(acts, minlength=num_replicas)
    steps = int(acts.size)
    return {
        "steps": steps,
        "episodes": len(trajs),
        "action_counts": [int(c) for c in counts],
        "action_distribution": [float(c) / steps if steps else 0.0 for c in counts],
        "balance": balance_score(counts),
        "mean_return": float(np.mean([np.sum(t.rews, dtype=np.float64) for t in trajs])),
        "mean_e2e_s": float(np.mean([t.infos[-1]["metrics"]["e2e_mean"] for t in trajs])),
        "mean_e2e_p99_s": float(np.mean([t.infos[-1]["metrics"]["e2e_p99"] for t in trajs])),
    }


def _versions() -> dict[str, str]:
    import imitation
    import stable_baselines3

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "imitation": imitation.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "llm_cluster_env": llm_cluster_env.__version__,
    }


def collect_demonstrations(*, env_config: EnvConfig, policies: Mapping[str, float],
                           total_steps: int, seed: int, imbalance: bool | ImbalanceSpec,
                           num_envs: int = 1, progress: bool = False):
    """Roll out heuristic routers in ``LLMCluster-v0`` with imitation (module docstring).

    :param env_config: the scenario, built once by the caller; its ``episode_requests`` is the
        episode length (requests).
    :param policies: router name -> weight (> 0); ``{"lor": 1.0}`` collects one policy.
    :param total_steps: transitions wanted in total (routed requests); split across policies
        in proportion to the weights, each rounded up to whole episodes.
    :param seed: root seed (int >= 0) of all env, router and shuffle randomness.
    :param num_envs: sub-envs per run (capped at the run's episode count).
    :param imbalance: ``True`` or an :class:`ImbalanceSpec`: also collect under alternating
        high/low arrival rates.
    :param progress: show progress (transitions; :mod:`sb3_warmstart.pipeline.progress`).
    :return: ``(trajectories, stats)``. ``trajectories`` is a list of imitation
        ``TrajectoryWithRew``, run after run. ``stats`` (JSON-able) holds ``format``,
        ``seed``, ``env_kwargs`` (``to_dict`` of ``env_config``: a complete record that
        rebuilds it with ``EnvConfig.from_kwargs``),
        ``episode_requests``, ``imbalance`` (spec or ``None``), ``weights``,
        ``total_steps_requested``, ``total_steps``, ``total_episodes``, ``policies`` (per
        router: ``weight``, ``steps_requested``, ``steps``, ``episodes``, ``share`` of all
        steps, ``action_counts``, ``action_distribution`` (fraction per replica), ``balance``
        (:func:`~llm_cluster_env.tools.evaluation.balance_score` of the action counts),
        ``mean_return``, ``mean_e2e_s``, ``mean_e2e_p99_s`` (episode means, seconds)),
        ``runs`` (the same per (policy, segment) plus its ``env_kwargs``, ``num_envs`` and
        ``episodes_collected`` before dropping the overshoot), ``trajectory_policies``,
        ``trajectory_segments`` and ``episode_seeds`` (parallel to ``trajectories``),
        ``schema`` (the env's ``layout.schema()``), ``versions`` and ``timing``.
    """
    from imitation.data import rollout

    from sb3_warmstart.pipeline.progress import ProgressPrinter

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an integer >= 0")
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs={num_envs!r}: must be an integer >= 1")
    plan = plan_collection(env_config=env_config, policies=policies, total_steps=total_steps,
                           imbalance=imbalance)
    seed = int(seed)
    trajectories: list = []
    run_stats: list[dict[str, Any]] = []
    labels: list[tuple[str, str]] = []
    schema: dict | None = None
    start = time.perf_counter()
    printer = ProgressPrinter("demos", sum(r.steps for r in plan.runs), "steps",
                              enabled=progress)
    done = 0
    try:
        for run in plan.runs:
            n_envs = min(int(num_envs), math.ceil(run.steps / plan.episode_requests))
            venv = make_demo_venv(run.env_config, [run.seed_sequence(seed, ENV_STREAM, i)
                                                   for i in range(n_envs)])
            try:
                layout = venv.get_attr("layout", indices=[0])[0]
                run_schema = layout.schema()
                if schema is None:
                    schema = run_schema
                elif run_schema != schema:  # pragma: no cover - workloads do not change layouts
                    raise RuntimeError(f"run {run.policy}/{run.segment}: observation schema "
                                       "differs from the first run's")
                policy = HeuristicPolicy(run.policy, layout, n_envs,
                                         seed=run.seed_sequence(seed, ROUTER_STREAM))
                printer.update(done, f"{run.policy}/{run.segment}")
                raw = rollout.generate_trajectories(
                    _ProgressPolicy(policy, printer, done) if progress else policy, venv,
                    rollout.make_min_timesteps(run.steps),
                    rng=np.random.default_rng(run.seed_sequence(seed, SHUFFLE_STREAM)))
            finally:
                venv.close()
            kept, total = [], 0
            for traj in raw:  # drop episodes that finished together past the target
                if total >= run.steps:
                    break
                kept.append(_clean_trajectory(traj))
                total += len(traj.acts)
            trajectories.extend(kept)
            labels.extend((run.policy, run.segment) for _ in kept)
            stats = _run_stats(kept, layout.num_replicas)
            run_stats.append({"policy": run.policy, "segment": run.segment,
                              "steps_requested": run.steps, **stats,
                              "episodes_collected": len(raw), "num_envs": n_envs,
                              "env_kwargs": to_dict(run.env_config)})
            done += run.steps
    finally:
        printer.close()
    elapsed = time.perf_counter() - start

    total = sum(len(t.acts) for t in trajectories)
    num_replicas = int(schema["num_replicas"])
    per_policy: dict[str, dict[str, Any]] = {}
    for name, weight in plan.weights.items():
        mine = [t for t, (p, _) in zip(trajectories, labels) if p == name]
        stats = _run_stats(mine, num_replicas)
        per_policy[name] = {
            "weight": weight,
            "steps_requested": sum(r.steps for r in plan.runs if r.policy == name),
            **stats,
            "share": stats["steps"] / total,
        }
    stats = {
        "format": FORMAT,
        "seed": seed,
        "env_kwargs": to_dict(plan.env_config),
        "episode_requests": plan.episode_requests,
        "imbalance": dataclasses.asdict(plan.imbalance) if plan.imbalance else None,
        "weights": dict(plan.weights),
        "num_envs": int(num_envs),
        "total_steps_requested": plan.total_steps,
        "total_steps": total,
        "total_episodes": len(trajectories),
        "policies": per_policy,
        "runs": run_stats,
        "trajectory_policies": [p for p, _ in labels],
        "trajectory_segments": [s for _, s in labels],
        "episode_seeds": [int(t.infos[-1]["episode_seed"]) for t in trajectories],
        "schema": schema,
        "versions": _versions(),
        "timing": {"seconds": elapsed, "steps_per_second": total / elapsed if elapsed else 0.0},
    }
    return trajectories, stats


__all__ = ["HeuristicPolicy", "collect_demonstrations", "make_demo_venv"]
