"""Demonstrations across a scenario family: the best heuristic of each sampled scenario.

For every demonstration episode a scenario is drawn from the family
(:class:`~llm_cluster_env.env.family.ScenarioFamilyEnv`, seeded from ``seed``); every candidate
router routes that same episode (same cluster, same requests), and the trajectory of the best
one is kept: the first candidate (in the given order, a preference) whose ``objective`` (mean
end-to-end latency by default, ``mean_ttft`` for a profile judged on first tokens;
:mod:`llm_cluster_env.tools.objectives`) is within ``margin`` of the lowest. The margin keeps
near-ties (on identical replicas every balanced rule is within a fraction of a percent) from
switching the expert back and forth between similar scenarios, which would only add label noise.
So the clone learns, per kind of cluster and workload, the rule that works best there, not one
rule everywhere.

Trajectories are imitation's ``TrajectoryWithRew`` (observations as the family env returns
them: ``replica_slots`` slots, the trailing ones empty for small clusters; rewards with the
scenario's reward scale), stored with
:func:`sb3_warmstart.warmstart.demo_store.save_demonstrations`. The last ``info`` of each
holds its episode metrics, seed, scenario, the expert and every candidate's objective value
(``candidates_<objective>``, e.g. ``candidates_mean_e2e``).
``stats["trajectory_policies"]`` names each trajectory's expert; :func:`expert_ties` gives the
tie sets behaviour cloning scores agreement with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from imitation.data.types import TrajectoryWithRew

from llm_cluster_env.env.family import (
    ScenarioFamilyConfig,
    ScenarioFamilyEnv,
    family_layout,
    load_family,
)
from llm_cluster_env.env.observation import ObservationLayout
from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.tools.evaluation import balance_score
from llm_cluster_env.tools.objectives import DEMO_OBJECTIVES, make_objective
from sb3_warmstart.warmstart.demo_store import FORMAT

#: Observation-only routers tried on every scenario, in order of preference (random, round
#: robin and Vidur's ``lor_waiting`` are never best; the look-ahead needs the simulator).
DEFAULT_CANDIDATES = ("least_added_time", "lor", "weighted_lor", "least_work_time", "llm_d")
#: Relative margin within which the earlier candidate is kept (see the module docstring).
DEFAULT_MARGIN = 0.005
_MAX_SEED = 2**63 - 1


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    names = list(candidates)
    if not names:
        raise ValueError("candidates: needs at least one router")
    for name in names:
        if name not in ROUTERS:
            raise ValueError(f"candidates: unknown router {name!r} (known: {', '.join(ROUTERS)})")
        if ROUTERS[name].requires_context:
            raise ValueError(f"candidates: {name!r} needs the simulator's state; demonstrations "
                             "come from routers that read the observation")
    return names


def _rollout(env: ScenarioFamilyEnv, router_name: str, seed: int) -> dict[str, Any]:
    obs, _ = env.reset(seed=seed)
    router = make_router(router_name)
    router.reset(env.num_replicas, np.random.default_rng(seed % _MAX_SEED + 7919))
    observations, actions, rewards = [obs], [], []
    done = False
    info: dict[str, Any] = {}
    while not done:
        action = router.select(env.view)
        obs, reward, done, _, info = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
    return {"obs": np.array(observations, dtype=np.float32),
            "acts": np.array(actions, dtype=np.int64),
            "rews": np.array(rewards, dtype=np.float64),
            "metrics": {k: float(v) for k, v in info["metrics"].items()},
            "scenario": info["scenario"]}


def collect_best_heuristic_demonstrations(
        *, family: str | Mapping[str, Any] | ScenarioFamilyConfig, total_steps: int, seed: int,
        candidates: Sequence[str] = DEFAULT_CANDIDATES, margin: float = DEFAULT_MARGIN,
        objective: str = "mean_e2e", shared_cache: dict | None = None, progress: bool = False
        ) -> tuple[list[TrajectoryWithRew], dict[str, Any]]:
    """Collect at least ``total_steps`` transitions (whole episodes) of the best candidate per
    sampled scenario (module docstring).

    :param family: the scenario family (name, YAML path, mapping or config).
    :param total_steps: transitions to collect (rounded up to whole episodes).
    :param seed: root of every episode's seed (``SeedSequence(seed)``).
    :param candidates: observation-only router names tried on every scenario, preferred first.
    :param margin: relative ``objective`` margin within which an earlier candidate counts as
        best.
    :param objective: what candidates are ranked by, one of
        :data:`~llm_cluster_env.tools.objectives.DEMO_OBJECTIVES`.
    :param shared_cache: shared with the family env (measured capacities, env parts).
    :param progress: print one line per episode.
    :return: ``(trajectories, stats)``; stats are JSON-able (format of
        :func:`sb3_warmstart.warmstart.demo_store.save_demonstrations`).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin={margin}: must be in [0, 1)")
    if objective not in DEMO_OBJECTIVES:
        raise ValueError(f"objective={objective!r}: must be one of {DEMO_OBJECTIVES}")
    scorer = make_objective(objective)
    names = _check_candidates(candidates)
    config = load_family(family)
    env = ScenarioFamilyEnv(config, shared_cache=shared_cache)
    layout = family_layout(config)
    seeds = np.random.default_rng(np.random.SeedSequence(seed))
    trajectories: list[TrajectoryWithRew] = []
    experts: list[str] = []
    wins = dict.fromkeys(names, 0)
    gaps: list[float] = []
    steps = 0
    start = time.perf_counter()
    while steps < total_steps:
        episode_seed = int(seeds.integers(_MAX_SEED))
        runs = {name: _rollout(env, name, episode_seed) for name in names}
        score = {name: scorer.value(run["metrics"]) for name, run in runs.items()}
        lowest = min(score.values())
        best = next(n for n in names if score[n] <= lowest * (1.0 + margin))
        run = runs[best]
        infos = np.array([{}] * (len(run["acts"]) - 1) + [{
            "metrics": run["metrics"], "episode_seed": episode_seed, "expert": best,
            "scenario": run["scenario"], f"candidates_{objective}": score}], dtype=object)
        trajectories.append(TrajectoryWithRew(obs=run["obs"], acts=run["acts"], infos=infos,
                                              terminal=True, rews=run["rews"]))
        experts.append(best)
        wins[best] += 1
        gaps.append(score["lor"] / lowest - 1.0 if "lor" in score else 0.0)
        steps += len(run["acts"])
        if progress:
            print(f"[demos] episode {len(trajectories)}: {run['scenario']['replicas']} replicas, "
                  f"{run['scenario']['lengths']}, load {run['scenario']['load']:.2f} -> {best} "
                  f"({steps}/{total_steps} steps, {time.perf_counter() - start:.0f} s)",
                  flush=True)
    acts = np.concatenate([t.acts for t in trajectories])
    counts = np.bincount(acts, minlength=layout.num_slots)
    stats = {
        "format": FORMAT,
        "family": config.name,
        "schema": layout.schema(),
        "candidates": names,
        "margin": margin,
        "objective": objective,
        "trajectory_policies": experts,
        "expert_wins": wins,
        "lor_over_best_mean": float(np.mean(gaps)),
        "total_steps": int(acts.size),
        "total_episodes": len(trajectories),
        "action_counts": [int(c) for c in counts],
        "balance": balance_score(counts[counts > 0]) if counts.any() else 1.0,
        "seed": seed,
        "collection_s": round(time.perf_counter() - start, 2),
    }
    return trajectories, stats


def expert_ties(trajectories: Sequence[TrajectoryWithRew], experts: Sequence[str],
                layout: ObservationLayout) -> list[list[np.ndarray | None]]:
    """Per trajectory, per step: the replicas its expert considers equally good (``None``
    where the expert's rule is not a function of the observation)."""
    out = []
    for traj, name in zip(trajectories, experts, strict=True):
        router = make_router(name)
        router.reset(layout.num_slots)
        rows = []
        for obs in traj.obs[: len(traj.acts)]:
            rows.append(router.tied_choices(layout.view(obs)))
        out.append(rows)
    return out


__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_MARGIN", "collect_best_heuristic_demonstrations",
           "expert_ties"]
