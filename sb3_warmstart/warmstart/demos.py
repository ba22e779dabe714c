"""Heuristic demonstrations for behaviour cloning, collected and stored with ``imitation``.

A heuristic router (:mod:`llm_cluster_env.routing.heuristics`) drives ``LLMCluster-v0`` through
:func:`imitation.data.rollout.generate_trajectories`. :class:`HeuristicPolicy` decides from
``layout.view(obs)``, i.e. from exactly the observation vector an agent sees, so demonstrations,
behaviour cloning and PPO share one state builder. Trajectories are imitation's own
:class:`~imitation.data.types.TrajectoryWithRew`.

Collection (:func:`collect_demonstrations`)
-------------------------------------------
``policies`` maps router names to weights; ``{"lor": 1.0}`` is single-policy mode. The
requested transitions are split across policies in proportion to the weights (largest
remainder). With ``imbalance`` each policy's share is further split between the base scenario
and an *imbalance* segment whose arrivals alternate a high and a low rate
(``workload.arrival="phases"``, rates a multiple of the scenario's mean rate), so the clone
also sees queues build and drain. Each (policy, segment) pair is one *run*: its own
``DummyVecEnv`` of ``RolloutInfoWrapper(EpisodeSeedWrapper(make_base_env(config)))``
and one ``generate_trajectories(..., make_min_timesteps(steps))`` call.

imitation only returns complete episodes, so a run yields a whole number of episodes of
``episode_requests`` steps (fewer only with ``oversize_policy="reject"``). When ``env_kwargs``
does not set ``episode_requests``, it becomes ``min(scenario value, smallest run's steps)``;
when it does, every run must plan at least one episode (else ``ValueError``). A run therefore
overshoots its planned steps by less than one episode; with several envs, episodes that finish
together past the target are dropped (imitation shuffles first, so the kept ones are a random
subset). Stats report planned and actual counts.

Seeds: everything derives from ``seed`` through ``np.random.SeedSequence(seed, spawn_key=(
crc32(policy), segment, purpose, env))``: every episode of every env gets its own explicit
seed (recorded in the stats and in the trajectory's last ``info``), routers draw from their
own streams, and imitation's shuffle from another. A run's data does not depend on which other
policies are collected; two calls with the same arguments return identical trajectories.

Each trajectory's ``infos`` is reduced to ``{}`` per step except the last one, which holds
``{"metrics": <episode metrics>, "episode_seed": <int>}``; ``obs`` and ``rews`` are the
unwrapped ones of ``RolloutInfoWrapper`` (float32 observations as the env returns them,
float64 rewards), as in :func:`imitation.data.rollout.rollout`.

On-disk format (:func:`save_demonstrations`)
--------------------------------------------
One directory ``<path>/``: the HuggingFace ``datasets`` directory written by
:func:`imitation.data.serialize.save` (so ``imitation.data.serialize.load(path)`` and
``load_with_rewards(path)`` read it directly) plus ``<path>/stats.json`` (see
:func:`collect_demonstrations` for its keys). The directory is written under a temporary
sibling name and swapped into place atomically (``renameat2(RENAME_EXCHANGE)`` on Linux), so a
crash leaves either the previous complete set or the new complete one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import llm_cluster_env
from llm_cluster_env.atomic import fsync_dir, make_temporary_dir
from llm_cluster_env.config import EnvConfig, PhaseConfig
from llm_cluster_env.env.observation import ObservationLayout
from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.sim.metrics import balance_score
from llm_cluster_env.validation import to_dict
from sb3_warmstart.pipeline.envs import EpisodeSeedWrapper, make_base_env

FORMAT = "sb3_warmstart/demos/v1"
STATS_FILE = "stats.json"
SEGMENTS = ("base", "imbalance")
_ENV_STREAM, _ROUTER_STREAM, _SHUFFLE_STREAM = range(3)


# --------------------------------------------------------------------------------- policy
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


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ImbalanceSpec:
    """Imbalance segments: arrivals alternate ``high`` and ``low`` rate phases.

    The phases are ``[{duration_s, qps: high_factor * q}, {duration_s, qps: low_factor * q}]``
    with ``q`` the scenario's mean arrival rate (``workload.qps``, or the time-weighted mean of
    a ``phases`` scenario); inter-arrival ``cv`` and request lengths stay the scenario's.

    :param high_factor: rate of the high phase as a multiple of the scenario's rate (1.4 at a
        70 % load scenario is ~100 % of saturation: queues build).
    :param low_factor: rate of the low phase as a multiple of the scenario's rate (queues
        drain).
    :param fraction: share of each policy's transitions collected under imbalance, in (0, 1];
        the rest uses the base scenario.
    :param cycles_per_episode: when ``duration_s`` is ``None``, phases last so that one episode
        holds this many high+low cycles on average:
        ``duration_s = episode_requests / (cycles * (high + low rate))`` seconds.
    :param duration_s: length of each phase (seconds); ``None`` derives it as above.
    """

    high_factor: float = 1.4
    low_factor: float = 0.5
    fraction: float = 0.5
    cycles_per_episode: float = 2.0
    duration_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("high_factor", "low_factor", "cycles_per_episode"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"imbalance.{name}={value!r}: must be a finite number > 0")
        if not self.high_factor > self.low_factor:
            raise ValueError(f"imbalance.high_factor={self.high_factor!r}: must exceed "
                             f"low_factor={self.low_factor!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"imbalance.fraction={self.fraction!r}: must be in (0, 1]")
        if self.duration_s is not None and not (math.isfinite(self.duration_s)
                                                and self.duration_s > 0):
            raise ValueError(f"imbalance.duration_s={self.duration_s!r}: must be > 0 seconds")

    def phases(self, config: EnvConfig) -> list[dict[str, float]]:
        """The two phases (``{"duration_s", "qps"}`` dicts) for the scenario ``config``."""
        workload = config.workload
        if workload.arrival in ("poisson", "gamma"):
            base_qps = workload.qps
        elif workload.arrival == "phases":
            total = sum(p.duration_s for p in workload.phases)
            base_qps = sum(p.duration_s * p.qps for p in workload.phases) / total
        else:
            raise ValueError(f"imbalance: workload.arrival={workload.arrival!r} has no "
                             "synthetic rate to modulate (needs poisson, gamma or phases)")
        high, low = self.high_factor * base_qps, self.low_factor * base_qps
        duration = self.duration_s
        if duration is None:
            duration = config.episode_requests / (self.cycles_per_episode * (high + low))
        return [{"duration_s": float(duration), "qps": float(high)},
                {"duration_s": float(duration), "qps": float(low)}]


@dataclass(frozen=True)
class CollectionRun:
    """One (policy, segment) pair of a collection: its env, step budget and seeds.

    :param policy: router name.
    :param segment: ``"base"`` or ``"imbalance"``.
    :param steps: transitions planned (the run returns at least this many, whole episodes).
    :param env_kwargs: keyword arguments of ``LLMCluster-v0`` for this run (JSON-able record).
    :param env_config: the same, built: what the run's environments are made from.
    """

    policy: str
    segment: str
    steps: int
    env_kwargs: Mapping[str, Any]
    env_config: EnvConfig

    def seed_sequence(self, seed: int, stream: int, index: int = 0) -> np.random.SeedSequence:
        """The seed stream ``stream`` (env episodes, router, shuffle) of env ``index``."""
        key = (zlib.crc32(self.policy.encode()), SEGMENTS.index(self.segment), stream, index)
        return np.random.SeedSequence(seed, spawn_key=key)


@dataclass(frozen=True)
class CollectionPlan:
    """Validated runs of a collection (see :func:`plan_collection`)."""

    runs: tuple[CollectionRun, ...]
    env_kwargs: Mapping[str, Any]
    episode_requests: int
    total_steps: int
    weights: Mapping[str, float]
    imbalance: ImbalanceSpec | None


def _check_policies(policies: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(policies, Mapping) or not policies:
        raise ValueError(f"policies={policies!r}: must be a non-empty mapping of router name "
                         "-> weight, e.g. {'lor': 1.0}")
    out: dict[str, float] = {}
    for name, weight in policies.items():
        if name not in ROUTERS:
            raise ValueError(f"policies: router={name!r}: unknown router "
                             f"(known: {', '.join(ROUTERS)})")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight <= 0):
            raise ValueError(f"policies[{name!r}]={weight!r}: weight must be a finite number > 0")
        out[name] = float(weight)
    return out


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton's method)."""
    weights_arr = np.asarray(weights, dtype=np.float64)
    quotas = total * weights_arr / weights_arr.sum()
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def plan_collection(*, env_kwargs: Mapping[str, Any] | None = None,
                    env_config: EnvConfig | None = None, policies: Mapping[str, float],
                    total_steps: int, imbalance: bool | ImbalanceSpec) -> CollectionPlan:
    """Validate the arguments of :func:`collect_demonstrations` and split the step budget.

    The environment is given either as ``env_kwargs`` (built here) or as an already built
    ``env_config`` (whose ``episode_requests`` is then the episode length). Raises
    ``ValueError`` (or :class:`llm_cluster_env.ConfigError`) naming the argument and value
    before any rollout. See :func:`collect_demonstrations` for the arguments.
    """
    weights = _check_policies(policies)
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) \
            or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 1 transition")
    if imbalance is True:
        imbalance = ImbalanceSpec()
    elif imbalance is False or imbalance is None:
        imbalance = None
    elif not isinstance(imbalance, ImbalanceSpec):
        raise ValueError(f"imbalance={imbalance!r}: must be a bool or an ImbalanceSpec")
    if (env_kwargs is None) == (env_config is None):
        raise ValueError("give exactly one of env_kwargs and env_config")
    if env_config is not None:
        if not isinstance(env_config, EnvConfig):
            raise ValueError(f"env_config: expected an EnvConfig, got {type(env_config).__name__}")
        config = env_config
        env_kwargs = to_dict(config)  # a complete, JSON-able record that rebuilds it
        explicit_length = True
    else:
        try:  # a private deep copy, JSON-able because it is stored in stats.json
            env_kwargs = json.loads(json.dumps(dict(env_kwargs)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"env_kwargs: must be JSON-able (it is stored with the "
                             f"demonstrations): {err}") from err
        config = EnvConfig.from_kwargs(**env_kwargs)  # ConfigError names the field
        explicit_length = "episode_requests" in env_kwargs

    fraction = imbalance.fraction if imbalance else 0.0
    keys: list[tuple[str, str]] = []
    run_weights: list[float] = []
    for name, weight in weights.items():
        for segment, share in (("base", 1.0 - fraction), ("imbalance", fraction)):
            if share > 0:
                keys.append((name, segment))
                run_weights.append(weight * share)
    steps = _largest_remainder(int(total_steps), run_weights)
    smallest = int(np.argmin(steps))
    if steps[smallest] < 1:
        name, segment = keys[smallest]
        raise ValueError(f"total_steps={total_steps}: too small to give policy {name!r} "
                         f"(weight {weights[name]:g}, segment {segment!r}) a single step")

    if explicit_length:
        episode_requests = config.episode_requests
        if steps[smallest] < episode_requests:
            name, segment = keys[smallest]
            raise ValueError(
                f"episode_requests={episode_requests}: exceeds the {steps[smallest]} steps "
                f"planned for policy {name!r} (segment {segment!r}) out of "
                f"total_steps={total_steps}; imitation returns whole episodes only, so lower "
                "episode_requests or raise total_steps")
    else:
        episode_requests = min(config.episode_requests, steps[smallest])
        env_kwargs["episode_requests"] = episode_requests
        config = dataclasses.replace(config, episode_requests=episode_requests)

    imbalance_kwargs: dict[str, Any] | None = None
    imbalance_config: EnvConfig | None = None
    if imbalance:
        phases = imbalance.phases(config)
        imbalance_kwargs = json.loads(json.dumps(env_kwargs))
        workload = dict(imbalance_kwargs.get("workload") or {})
        workload.update(arrival="phases", phases=phases)
        imbalance_kwargs["workload"] = workload
        imbalance_config = dataclasses.replace(config, workload=dataclasses.replace(
            config.workload, arrival="phases",
            phases=tuple(PhaseConfig(**phase) for phase in phases)))
    runs = tuple(
        CollectionRun(name, segment, n,
                      imbalance_kwargs if segment == "imbalance" else env_kwargs,
                      imbalance_config if segment == "imbalance" else config)
        for (name, segment), n in zip(keys, steps))
    return CollectionPlan(runs=runs, env_kwargs=env_kwargs, episode_requests=episode_requests,
                          total_steps=int(total_steps), weights=weights, imbalance=imbalance)


# ---------------------------------------------------------------------------- collection
class _ProgressPolicy:
    """Reports the steps taken to a :class:`~sb3_warmstart.pipeline.progress.ProgressPrinter` on every
    call of the wrapped policy."""

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
    """``DummyVecEnv`` of ``RolloutInfoWrapper(EpisodeSeedWrapper(make_base_env(...)))``, one sub-env
    per seed sequence (the source of that sub-env's episode seeds), all from ``env_config``."""
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


def collect_demonstrations(*, env_kwargs: Mapping[str, Any] | None = None,
                           env_config: EnvConfig | None = None, policies: Mapping[str, float],
                           total_steps: int, seed: int, imbalance: bool | ImbalanceSpec,
                           num_envs: int = 1, progress: bool = False):
    """Roll out heuristic routers in ``LLMCluster-v0`` with imitation (module docstring).

    :param env_kwargs: keyword arguments of ``gym.make("LLMCluster-v0", ...)`` (``scenario``
        and any :class:`~llm_cluster_env.config.EnvConfig` field, nested configs as dicts).
    :param env_config: instead of ``env_kwargs``, the built config (its ``episode_requests`` is
        the episode length; ``stats["env_kwargs"]`` then records all of it).
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
        ``seed``, ``env_kwargs`` (base run, with the ``episode_requests`` used),
        ``episode_requests``, ``imbalance`` (spec or ``None``), ``weights``,
        ``total_steps_requested``, ``total_steps``, ``total_episodes``, ``policies`` (per
        router: ``weight``, ``steps_requested``, ``steps``, ``episodes``, ``share`` of all
        steps, ``action_counts``, ``action_distribution`` (fraction per replica), ``balance``
        (:func:`~llm_cluster_env.sim.metrics.balance_score` of the action counts),
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
    plan = plan_collection(env_kwargs=env_kwargs, env_config=env_config, policies=policies,
                           total_steps=total_steps, imbalance=imbalance)
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
            venv = make_demo_venv(run.env_config, [run.seed_sequence(seed, _ENV_STREAM, i)
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
                                         seed=run.seed_sequence(seed, _ROUTER_STREAM))
                printer.update(done, f"{run.policy}/{run.segment}")
                raw = rollout.generate_trajectories(
                    _ProgressPolicy(policy, printer, done) if progress else policy, venv,
                    rollout.make_min_timesteps(run.steps),
                    rng=np.random.default_rng(run.seed_sequence(seed, _SHUFFLE_STREAM)))
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
                              "env_kwargs": run.env_kwargs})
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
        "env_kwargs": plan.env_kwargs,
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


# ------------------------------------------------------------------------------ storage
class DemonstrationMismatchError(ValueError):
    """Stored demonstrations were recorded with a different observation layout."""


def _layout_of(env: Any) -> ObservationLayout:
    if isinstance(env, ObservationLayout):
        return env
    unwrapped = getattr(env, "unwrapped", None)
    if unwrapped is not None and hasattr(unwrapped, "layout"):
        return unwrapped.layout
    if hasattr(env, "get_attr"):  # an SB3 VecEnv
        return env.get_attr("layout", indices=[0])[0]
    raise TypeError(f"env={env!r}: expected an LLMCluster env, a VecEnv of them or a layout")


def schema_differences(stored: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two ``layout.schema()`` dicts (empty if equal)."""
    stored = json.loads(json.dumps(dict(stored)))
    actual = json.loads(json.dumps(dict(actual)))
    out = []
    for key in sorted(set(stored) | set(actual)):
        if key not in actual:
            out.append(f"{key}: in the demonstrations ({stored[key]!r}) but not in the env")
            continue
        if key not in stored:
            out.append(f"{key}: in the env ({actual[key]!r}) but not in the demonstrations")
            continue
        a, b = stored[key], actual[key]
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            parts = []
            if len(a) != len(b):
                parts.append(f"length {len(a)} in the demonstrations vs {len(b)} in the env")
            if first is not None:
                parts.append(f"first difference at [{first}]: {a[first]!r} vs {b[first]!r}")
            elif len(a) != len(b):
                longer, which = (a, "demonstrations") if len(a) > len(b) else (b, "env")
                parts.append(f"extra in the {which}: {longer[min(len(a), len(b))]!r}...")
            out.append(f"{key}: " + "; ".join(parts))
        else:
            out.append(f"{key}: {a!r} in the demonstrations vs {b!r} in the env")
    return out


def check_demonstrations_match_env(stats: Mapping[str, Any], env: Any) -> None:
    """Raise :class:`DemonstrationMismatchError` naming each schema field that differs between
    the demonstrations' ``stats["schema"]`` and ``env``'s ``layout.schema()``.

    :param stats: the stats of :func:`collect_demonstrations` / :func:`load_demonstrations`.
    :param env: an ``LLMCluster-v0`` env (wrapped or not), a VecEnv of them, or a layout.
    """
    if "schema" not in stats:
        raise DemonstrationMismatchError("stats has no 'schema': cannot check the demonstrations "
                                         "against the env")
    diffs = schema_differences(stats["schema"], _layout_of(env).schema())
    if diffs:
        raise DemonstrationMismatchError(
            "demonstrations do not match the env's observation layout: " + " | ".join(diffs))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    platform or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_output_replaceable(path: str | os.PathLike) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and is not an earlier demonstration set
    (an empty directory is fine): :func:`save_demonstrations` never replaces anything else."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"path={str(path)!r}: exists and is not a demonstration directory; "
                              "refusing to replace it")
    if not (path / STATS_FILE).is_file() and any(path.iterdir()):
        raise FileExistsError(f"path={str(path)!r}: an existing directory without {STATS_FILE} "
                              "(not a demonstration set); refusing to replace it")


def save_demonstrations(path: str | os.PathLike, trajectories: Sequence, stats: Mapping[str, Any]
                        ) -> Path:
    """Write ``trajectories`` and ``stats`` to the directory ``path``, atomically.

    The HuggingFace dataset of :func:`imitation.data.serialize.save` and ``stats.json`` are
    written into a temporary sibling directory, then swapped with ``path``; a previous set at
    ``path`` is deleted only after the swap. On any error the temporary directory is removed
    and ``path`` is untouched. ``path`` may only replace an earlier demonstration set.

    :param path: output directory.
    :param trajectories: imitation ``TrajectoryWithRew`` sequence.
    :param stats: JSON-able statistics (as from :func:`collect_demonstrations`).
    :return: ``path`` as a ``Path``.
    """
    from imitation.data import serialize

    path = Path(path)
    check_output_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(stats), indent=1)  # fails here (not half-way) if not JSON-able
    tmp = make_temporary_dir(path.parent, f".{path.name}.tmp-")
    old: Path | None = None
    try:
        serialize.save(tmp, trajectories)
        with open(tmp / STATS_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)  # atomic; fails if someone created path meanwhile
        elif _rename_exchange(tmp, path):
            old = tmp  # the previous set now lives at the temporary name
        else:  # no atomic exchange: keep the old set complete under a backup name until done
            old = make_temporary_dir(path.parent, f".{path.name}.old-")
            os.rename(path, old / "set")
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old / "set", path)
                raise
        fsync_dir(path.parent)
    except BaseException:
        if old != tmp:  # after an exchange, tmp holds the previous set: leave both intact
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old != tmp and not (old / "set").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_stats(path: str | os.PathLike) -> dict[str, Any] | None:
    """``<path>/stats.json`` as a dict (``None`` when the set has none, e.g. a bare
    ``imitation.data.serialize.save`` directory).

    :raises ValueError: the file is not a JSON object.
    """
    stats_path = Path(path) / STATS_FILE
    if not stats_path.is_file():
        return None
    try:
        stats = json.loads(stats_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{stats_path}: corrupt JSON ({err})") from err
    if not isinstance(stats, dict):
        raise ValueError(f"{stats_path}: expected a JSON object, got {type(stats).__name__}")
    return stats


def load_demonstrations(path: str | os.PathLike) -> tuple[list, dict[str, Any]]:
    """Load and validate a set written by :func:`save_demonstrations`.

    :param path: the demonstration directory.
    :return: ``(trajectories, stats)``: a list of ``TrajectoryWithRew`` (float32 observations,
        as the env returns them) and the stats dict.
    :raises FileNotFoundError: ``path`` or its ``stats.json`` is missing.
    :raises ValueError: ``stats.json`` or the dataset is corrupt or inconsistent.
    """
    from imitation.data import serialize

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"demonstrations path={str(path)!r}: does not exist")
    if not path.is_dir():
        raise ValueError(f"demonstrations path={str(path)!r}: not a directory (a demonstration "
                         "set is the directory written by save_demonstrations)")
    stats_path = path / STATS_FILE
    stats = read_stats(path)
    if stats is None:
        raise FileNotFoundError(f"demonstrations path={str(path)!r}: missing {STATS_FILE} (not "
                                "written by save_demonstrations, or an incomplete copy)")
    if stats.get("format") != FORMAT:
        raise ValueError(f"{stats_path}: format={stats.get('format')!r}, expected {FORMAT!r}")
    for key in ("schema", "trajectory_policies", "total_steps", "total_episodes"):
        if key not in stats:
            raise ValueError(f"{stats_path}: missing key {key!r}")
    try:
        trajectories = list(serialize.load_with_rewards(path))
    except Exception as err:
        raise ValueError(f"demonstrations path={str(path)!r}: corrupt trajectory dataset "
                         f"({type(err).__name__}: {err})") from err
    if len(trajectories) != stats["total_episodes"]:
        raise ValueError(f"{path}: {len(trajectories)} trajectories but stats "
                         f"total_episodes={stats['total_episodes']}")
    if len(stats["trajectory_policies"]) != len(trajectories):
        raise ValueError(f"{stats_path}: trajectory_policies has "
                         f"{len(stats['trajectory_policies'])} entries for {len(trajectories)} "
                         "trajectories")
    steps = sum(len(t.acts) for t in trajectories)
    if steps != stats["total_steps"]:
        raise ValueError(f"{path}: {steps} transitions but stats "
                         f"total_steps={stats['total_steps']}")
    width = len(stats["schema"]["feature_names"])
    num_replicas = stats["schema"]["num_replicas"]
    for i, traj in enumerate(trajectories):
        if traj.obs.ndim != 2 or traj.obs.shape[1] != width:
            raise ValueError(f"{path}: trajectory {i} obs.shape={traj.obs.shape}, expected "
                             f"(T+1, {width}) from the stored schema")
        if traj.acts.size and not (0 <= traj.acts.min() and traj.acts.max() < num_replicas):
            raise ValueError(f"{path}: trajectory {i} has actions outside [0, {num_replicas})")
        # The dataset stores float32; imitation's loader hands back float64 copies. Restore the
        # env's dtype (exact) so loaded observations equal collected ones bit for bit.
        trajectories[i] = dataclasses.replace(traj, obs=traj.obs.astype(np.float32))
    return trajectories, stats


__all__ = [
    "CollectionPlan",
    "CollectionRun",
    "DemonstrationMismatchError",
    "EpisodeSeedWrapper",
    "HeuristicPolicy",
    "ImbalanceSpec",
    "check_demonstrations_match_env",
    "check_output_replaceable",
    "collect_demonstrations",
    "load_demonstrations",
    "read_stats",
    "make_demo_venv",
    "plan_collection",
    "save_demonstrations",
    "schema_differences",
]
