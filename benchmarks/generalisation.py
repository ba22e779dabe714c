"""Learned routers and planners against every heuristic and the look-ahead, on scenarios
training never sampled.

Grid (each cell a fixed cluster and workload; loads are fractions of measured saturation
throughput for the cell's lengths, :mod:`llm_cluster_env.env.capacity`). "Long prompts" are
log-normal prompts of median 2,000 and outputs of median 30 tokens (sigma 0.6 both):

======================================  ============================  ==============================
cell                                    cluster                       workload
======================================  ============================  ==============================
``arxiv_4xA100_70``                     4x A100                       arXiv lengths, Poisson, 70%
``arxiv_4xA100_90``                     4x A100                       arXiv lengths, Poisson, 90%
``longprompt_bursty_4xA100``            4x A100                       long prompts, gamma CV 3, 70%
``longprompt_2xA100_2xH100``            2x A100 + 2x H100             long prompts, Poisson, 70%
``conv_8xA100``                         8x A100                       conversation, Poisson, 75%
``conv_32xA100``                        32x A100 (2x the largest      conversation, Poisson, 75%
                                        trained)
``conv_2xA40_2xH100``                   2x A40 + 2x H100              conversation, Poisson, 70%
``longprompt_bursty_2xA100_2xH100``     2x A100 + 2x H100             long prompts, gamma CV 3, 70%
``longprompt_2xA100_2xH100_92``         2x A100 + 2x H100             long prompts, Poisson, 92%
``conv_3gpu_93``                        2x A100 + 2x H100 + 2x A40    conversation, Poisson, 93%
``conv_phases3x_4xA100``                4x A100                       conversation, 6 s phases at
                                                                      112.5% / 37.5% (3x swing)
``longprompt_phases3x_2xA100_2xH100``   2x A100 + 2x H100             long prompts, 3 s phases at
                                                                      112.5% / 37.5% (3x swing)
======================================  ============================  ==============================

:func:`off_family_reasons` names, per cell, what the ``generalist`` training family cannot draw
(replica counts outside 2-16, three GPU types, length medians, CVs or phase lengths off the
family's grid or range). The first cells differ from family draws only in their exact load.

Rows: every heuristic of :data:`llm_cluster_env.routing.heuristics.ROUTERS` (the prefix-cache-aware
ones included: no cell caches prefixes, so they fall back to their load rules), ``lookahead``, the
rollout planner (``rollout_planner``) and its clairvoyant version, and per ``--policy`` run
folder the PPO policy, its behaviour clone (``pretrained/bc_policy.zip``) and the distilled
policy (``pretrained/distilled_policy.zip``) when the run has one.

Statistics: every router serves the same arrivals per seed. Per row, the paired mean relative
difference of per-episode mean E2E latency against the cell's best heuristic (lowest mean over
the seeds, heuristics only) and against ``lookahead``, each with a 95 % bootstrap interval
(:func:`llm_cluster_env.tools.paired_stats.compare_paired`); "better"/"worse" only where the
interval excludes 0. The planners cost tens of milliseconds per decision, so they run on their
own, smaller set of episodes (``--planner-seeds`` x ``--planner-requests``), together with every
heuristic and ``lookahead`` on those same episodes: their rows compare against the best
heuristic and the look-ahead *of those episodes*.

Summary per learned policy and planner: mean over cells of the gap to the best heuristic (its
interval from resampling the seeds of every cell), the worst cell, the mean gap to the
look-ahead, and for the planner the share of the look-ahead -> clairvoyant gap it closes. The
verdicts on the issue's aims say "met" or "missed" only when the interval lies on one side of
the aim's bound, else "not shown".

Usage::

    python -m benchmarks.generalisation --policy runs/default [--episodes 10] [--requests 1500]
        [--planner-seeds 10] [--planner-requests 200] [--cells all] [--out results.json]
        [--markdown docs/generalisation.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text
from llm_cluster_env.config import EnvConfig, PhaseConfig, ReplicaConfig, WorkloadConfig
from llm_cluster_env.env.capacity import saturation_throughput
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import ScenarioFamilyConfig, load_family
from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.routing.planner import PlannerConfig, RolloutPlannerRouter
from llm_cluster_env.routing.registry import make_any_router
from llm_cluster_env.tools.evaluation import RouterResult, run_episode
from llm_cluster_env.tools.paired_stats import PairedComparison, compare_paired

LONG_PROMPT = {"lengths": "lognormal", "prompt_lognormal": (2000.0, 0.6),
               "output_lognormal": (30.0, 0.6)}
ARXIV = {"lengths": "empirical", "empirical": "arxiv_summarization"}
CONV = {"lengths": "empirical", "empirical": "splitwise_conv"}
A100_H100 = ("a100",) * 2 + ("h100",) * 2


@dataclass(frozen=True)
class Cell:
    """One grid cell: a fixed cluster and workload.

    :param gpus: the GPU of each replica (one Llama-2-7B replica per GPU).
    :param lengths: :class:`WorkloadConfig` length fields.
    :param arrival: ``"poisson"``, ``"gamma"`` or ``"phases"``.
    :param load: mean arrival rate as a fraction of the cluster's measured saturation
        throughput for these lengths.
    :param cv: coefficient of variation of the gaps (``gamma``; inside phases for ``phases``).
    :param phase_s: duration of each of the two phases (seconds; ``phases``).
    :param high_to_low: rate of the high phase over the low phase (``phases``); the mean over
        a cycle is ``load``.
    :param label: a short human description.
    """

    gpus: tuple[str, ...]
    lengths: Mapping[str, Any]
    arrival: str = "poisson"
    load: float = 0.70
    cv: float = 1.0
    phase_s: float = 0.0
    high_to_low: float = 1.0
    label: str = ""


CELLS: dict[str, Cell] = {
    "arxiv_4xA100_70": Cell(("a100",) * 4, ARXIV, load=0.70,
                            label="arXiv lengths, 4× A100, Poisson 70%"),
    "arxiv_4xA100_90": Cell(("a100",) * 4, ARXIV, load=0.90,
                            label="arXiv lengths, 4× A100, Poisson 90%"),
    "longprompt_bursty_4xA100": Cell(("a100",) * 4, LONG_PROMPT, "gamma", 0.70, cv=3.0,
                                     label="long prompts, 4× A100, gamma CV 3, 70%"),
    "longprompt_2xA100_2xH100": Cell(A100_H100, LONG_PROMPT, load=0.70,
                                     label="long prompts, 2× A100 + 2× H100, Poisson 70%"),
    "conv_8xA100": Cell(("a100",) * 8, CONV, load=0.75,
                        label="conversations, 8× A100, Poisson 75%"),
    "conv_32xA100": Cell(("a100",) * 32, CONV, load=0.75,
                         label="conversations, 32× A100, Poisson 75%"),
    "conv_2xA40_2xH100": Cell(("a40",) * 2 + ("h100",) * 2, CONV, load=0.70,
                              label="conversations, 2× A40 + 2× H100, Poisson 70%"),
    "longprompt_bursty_2xA100_2xH100": Cell(
        A100_H100, LONG_PROMPT, "gamma", 0.70, cv=3.0,
        label="long prompts, 2× A100 + 2× H100, gamma CV 3, 70%"),
    "longprompt_2xA100_2xH100_92": Cell(A100_H100, LONG_PROMPT, load=0.92,
                                        label="long prompts, 2× A100 + 2× H100, Poisson 92%"),
    "conv_3gpu_93": Cell(A100_H100 + ("a40",) * 2, CONV, load=0.93,
                         label="conversations, 2× A100 + 2× H100 + 2× A40, Poisson 93%"),
    "conv_phases3x_4xA100": Cell(("a100",) * 4, CONV, "phases", 0.75, phase_s=6.0,
                                 high_to_low=3.0,
                                 label="conversations, 4× A100, 6 s phases 112.5% / 37.5%"),
    "longprompt_phases3x_2xA100_2xH100": Cell(
        A100_H100, LONG_PROMPT, "phases", 0.75, phase_s=3.0, high_to_low=3.0,
        label="long prompts, 2× A100 + 2× H100, 3 s phases 112.5% / 37.5%"),
}
LOOKAHEAD = "lookahead"
#: Every heuristic: ``ROUTERS`` without the look-ahead baseline, which simulates the replicas.
HEURISTICS = tuple(n for n in ROUTERS if n != LOOKAHEAD)
PLANNER = "rollout_planner"
CLAIRVOYANT = "rollout_planner_clairvoyant"
PLANNERS = (PLANNER, CLAIRVOYANT)
#: Prefixes of the learned rows: PPO policy, behaviour clone, distilled policy.
LEARNED_KINDS = {"ppo": "", "bc": "pretrained/bc_policy.zip",
                 "distilled": "pretrained/distilled_policy.zip"}
#: The issue's aims (fractions of mean E2E latency).
AIM_MEAN_VS_BEST = -0.015
AIM_WORST_VS_BEST = 0.005
AIM_MEAN_VS_LOOKAHEAD = 0.005
AIM_GAP_CLOSED = 0.5
MARK_BEGIN = "<!-- generalisation:begin (generated by benchmarks/generalisation.py) -->"
MARK_END = "<!-- generalisation:end -->"


# ---------------------------------------------------------------------------------- cells
def _capacity(gpus: Sequence[str], lengths: WorkloadConfig, cache: dict) -> float:
    """Summed saturation throughput (requests/s) of one replica per GPU in ``gpus``, each GPU
    type measured once."""
    total = 0.0
    for gpu in sorted(set(gpus)):
        key = ("generalisation_capacity", gpu, lengths)
        if key not in cache:
            cache[key] = saturation_throughput(ReplicaConfig(gpu=gpu), lengths, 3000,
                                               shared_cache=cache)
        total += gpus.count(gpu) * cache[key]
    return total


def cell_workload(cell: Cell, capacity: float) -> WorkloadConfig:
    """The cell's workload at ``cell.load * capacity`` requests/s (the cycle mean for
    phases: the high phase runs ``2 * ratio / (1 + ratio)`` times the mean, as the family's)."""
    qps = cell.load * capacity
    arrivals: dict[str, Any] = {"arrival": cell.arrival, "qps": qps, "cv": cell.cv}
    if cell.arrival == "phases":
        low = 2.0 * qps / (1.0 + cell.high_to_low)
        arrivals["phases"] = (PhaseConfig(cell.phase_s, cell.high_to_low * low),
                              PhaseConfig(cell.phase_s, low))
    return WorkloadConfig(**cell.lengths, **arrivals)


def cell_config(name: str, requests: int, observation: Mapping[str, Any] | None = None,
                cache: dict | None = None) -> EnvConfig:
    """The :class:`EnvConfig` of a grid cell, its rate set from measured capacity."""
    cell = CELLS[name]
    cache = {} if cache is None else cache
    capacity = _capacity(list(cell.gpus), WorkloadConfig(**cell.lengths), cache)
    config = EnvConfig(name=name, replicas=tuple(ReplicaConfig(gpu=g) for g in cell.gpus),
                       workload=cell_workload(cell, capacity), episode_requests=requests)
    if observation:
        config = replace(config, observation=replace(config.observation, **observation))
    return config


def _on_grid(value: float, bounds: tuple[float, float], points: int, log: bool,
             decimals: int | None = None) -> bool:
    """Whether ``value`` is one of the values :func:`llm_cluster_env.env.family._grid` draws."""
    lo, hi = bounds
    if points == 1 or lo == hi:
        grid = np.array([math.sqrt(lo * hi) if log else 0.5 * (lo + hi)])
    else:
        grid = np.geomspace(lo, hi, points) if log else np.linspace(lo, hi, points)
    if decimals is not None:
        grid = np.round(grid, decimals)
    return bool(np.any(np.isclose(grid, value, rtol=1e-9, atol=1e-12)))


def _length_reasons(cell: Cell, family: ScenarioFamilyConfig) -> list[str]:
    kinds = {c.kind for c in family.lengths}
    if cell.lengths["lengths"] == "empirical":
        known = {c.empirical for c in family.lengths if c.kind == "empirical"}
        return [] if cell.lengths["empirical"] in known else ["empirical lengths not in family"]
    if "lognormal" not in kinds:
        return ["log-normal lengths not in family"]
    (prompt, sigma_p), (output, sigma_o) = (cell.lengths["prompt_lognormal"],
                                            cell.lengths["output_lognormal"])
    points = family.grid_points
    for choice in (c for c in family.lengths if c.kind == "lognormal"):
        if (_on_grid(prompt, choice.prompt_median, points, True, 1)
                and _on_grid(output, choice.output_median, points, True, 1)
                and sigma_p == sigma_o
                and _on_grid(sigma_p, choice.sigma, min(points, 3), False)):
            return []
    return [f"log-normal medians {prompt:g}/{output:g} (sigma {sigma_p:g}) off the family grid"]


def _arrival_reasons(cell: Cell, family: ScenarioFamilyConfig) -> list[str]:
    choices = [c for c in family.arrivals if c.kind == cell.arrival]
    if not choices:
        return [f"arrival {cell.arrival!r} not in family"]
    points = family.grid_points
    if cell.arrival == "gamma" and not any(_on_grid(cell.cv, c.cv, points, True)
                                           for c in choices):
        return [f"gamma CV {cell.cv:g} off the family grid"]
    if cell.arrival == "phases":
        reasons = []
        if cell.cv != 1.0:
            reasons.append(f"CV {cell.cv:g} inside phases (family: 1)")
        if not any(_on_grid(cell.phase_s, c.phase_s, points, False) for c in choices):
            reasons.append(f"{cell.phase_s:g} s phases off the family grid")
        if not any(_on_grid(cell.high_to_low, c.high_to_low, points, False) for c in choices):
            reasons.append(f"high/low {cell.high_to_low:g} off the family grid")
        return reasons
    return []


def off_family_reasons(cell: Cell, family: ScenarioFamilyConfig) -> list[str]:
    """What about ``cell`` the family can never draw (empty: only its exact load, a
    continuous draw, tells it apart)."""
    reasons = []
    lo, hi = family.replicas
    if not lo <= len(cell.gpus) <= hi:
        reasons.append(f"{len(cell.gpus)} replicas outside {lo}-{hi}")
    types = set(cell.gpus)
    if len(types) > (2 if family.mixed_gpus > 0 else 1):
        reasons.append(f"{len(types)} GPU types in one cluster")
    if not types <= set(family.gpus):
        reasons.append(f"GPU types {sorted(types - set(family.gpus))} not in family")
    if not family.load[0] <= cell.load <= family.load[1]:
        reasons.append(f"load {cell.load:g} outside {family.load[0]:g}-{family.load[1]:g}")
    return reasons + _length_reasons(cell, family) + _arrival_reasons(cell, family)


# -------------------------------------------------------------------------------- routers
def _planner(clairvoyant: bool) -> RolloutPlannerRouter:
    if clairvoyant:
        return RolloutPlannerRouter(PlannerConfig(clairvoyant=True))
    return make_any_router(PLANNER)


def baseline_routers(lookahead: bool = True, heuristics: Sequence[str] = HEURISTICS
                     ) -> dict[str, Callable[[], Any]]:
    """Factories of the heuristics and (optionally) ``lookahead``."""
    names = list(heuristics) + ([LOOKAHEAD] if lookahead else [])
    return {n: (lambda n=n: make_any_router(n)) for n in names}


#: Arrival processes whose futures ``rollout_planner`` can sample (it refuses the others; its
#: clairvoyant version replays the true future of any).
PLANNER_ARRIVALS = ("poisson", "gamma")


def planner_routers(cell: Cell) -> dict[str, Callable[[], Any]]:
    """Factories of the rollout planner (where it can sample the cell's arrivals) and its
    clairvoyant version."""
    routers: dict[str, Callable[[], Any]] = {}
    if cell.arrival in PLANNER_ARRIVALS:
        routers[PLANNER] = lambda: _planner(False)
    routers[CLAIRVOYANT] = lambda: _planner(True)
    return routers


def _single_thread_torch() -> None:
    """A batch-1 forward gains nothing from a second thread, and on a shared 2-core machine
    two threads waiting on each other made each decision ~20x slower."""
    import torch

    torch.set_num_threads(1)


def load_policy_routers(run_dirs: list[str]) -> dict[str, Callable[[], Any]]:
    """Router factories of trained policies (run folders or model zips), one per path."""
    from sb3_warmstart.policies.router import load_policy_router

    _single_thread_torch()
    factories: dict[str, Callable[[], Any]] = {}
    for path in run_dirs:
        name = f"policy:{Path(path).name}"
        factories[name] = (lambda p=path, n=name: load_policy_router(p, name=n))
    return factories


def learned_routers(run_dirs: list[str]) -> dict[str, Callable[[], Any]]:
    """Per run folder: ``ppo:<run>`` (its final policy), ``bc:<run>`` (the clone) and
    ``distilled:<run>`` (the distilled policy), each when its file exists; a model zip gives
    ``ppo:<stem>`` alone."""
    if not run_dirs:
        return {}
    from sb3_warmstart.policies.router import load_policy_router

    _single_thread_torch()
    factories: dict[str, Callable[[], Any]] = {}
    for run in map(Path, run_dirs):
        label = run.stem if run.suffix == ".zip" else run.name
        for kind, inside in LEARNED_KINDS.items():
            path = run / inside if inside else run
            if inside and (run.suffix == ".zip" or not path.is_file()):
                continue
            name = f"{kind}:{label}"
            factories[name] = (lambda p=path, n=name: load_policy_router(p, name=n))
    return factories


# ----------------------------------------------------------------------------- evaluation
@dataclass
class GroupResult:
    """Routers run on the same episodes of one cell.

    :param seeds: episode seeds.
    :param requests: requests per episode.
    :param results: per router, its per-episode metrics.
    :param seconds_per_decision: per router, wall seconds per routing decision.
    """

    seeds: list[int]
    requests: int
    results: dict[str, RouterResult] = field(default_factory=dict)
    seconds_per_decision: dict[str, float] = field(default_factory=dict)

    def per_seed(self, router: str, key: str = "e2e_mean") -> np.ndarray:
        """One value of ``key`` per seed (seconds for latencies)."""
        return np.array([ep[key] for ep in self.results[router].episodes], dtype=np.float64)

    def best_heuristic(self) -> str:
        """The heuristic with the lowest mean of per-episode mean E2E over the seeds."""
        means = {n: float(self.per_seed(n).mean()) for n in self.results if n in HEURISTICS}
        return min(means, key=means.__getitem__)


def run_group(name: str, routers: Mapping[str, Callable[[], Any]], seeds: list[int],
              requests: int, cache: dict,
              progress: Callable[[str], None] | None = None) -> GroupResult:
    """Every router on every seed of cell ``name`` (the same arrivals per seed)."""
    env = LLMClusterEnv(config=cell_config(name, requests, cache=cache), shared_cache=cache)
    group = GroupResult(list(seeds), requests)
    for router_name, factory in routers.items():
        result = RouterResult(router_name)
        router = factory()
        decisions = 0
        start = time.perf_counter()
        for seed in seeds:
            metrics, latencies = run_episode(env, router, seed)
            decisions += len(latencies.e2e)
            clip = getattr(router, "clip_report", None)
            if clip is not None:
                metrics.update(clip())
            result.episodes.append(metrics)
        elapsed = time.perf_counter() - start
        group.results[router_name] = result
        group.seconds_per_decision[router_name] = elapsed / max(decisions, 1)
        if progress:
            progress(f"{name} ({len(seeds)}x{requests}): {router_name} mean E2E "
                     f"{result.mean('e2e_mean'):.3f} s ({elapsed:.1f} s)")
    return group


# ----------------------------------------------------------------------------- statistics
def comparison_dict(comparison: PairedComparison) -> dict[str, Any]:
    """A :class:`PairedComparison` as JSON (fractions) with its verdict."""
    return {"mean": comparison.mean, "low": comparison.low, "high": comparison.high,
            "seeds": comparison.seeds, "verdict": comparison.verdict}


def group_rows(group: GroupResult, rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per router of ``rows``: its numbers and its paired comparisons with the best heuristic
    and the look-ahead of the same episodes."""
    best = group.best_heuristic()
    out: dict[str, dict[str, Any]] = {}
    for router in rows:
        res = group.results[router]
        e2e = group.per_seed(router)
        row: dict[str, Any] = {
            "seeds": len(group.seeds), "requests": group.requests, "best_heuristic": best,
            "e2e_mean_per_seed": e2e.tolist(), "e2e_mean": float(e2e.mean()),
            "e2e_p99": res.mean("e2e_p99"), "ttft_mean": res.mean("ttft_mean"),
            "ms_per_decision": 1e3 * group.seconds_per_decision[router],
            "clip_share": res.mean("decisions_at_clip"),
            "vs_best": comparison_dict(compare_paired(e2e, group.per_seed(best)))}
        if LOOKAHEAD in group.results:
            row["vs_lookahead"] = comparison_dict(
                compare_paired(e2e, group.per_seed(LOOKAHEAD)))
        out[router] = row
    return out


def relative(candidate: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per-seed ``(candidate - baseline) / baseline`` (fractions)."""
    c, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    return (c - b) / b


def resampled_cell_means(diffs_by_cell: Sequence[np.ndarray], rng: np.random.Generator,
                         resamples: int) -> np.ndarray:
    """``(resamples, cells)`` means of each cell's per-seed values, the seeds of every cell
    resampled with replacement independently (a stratified bootstrap)."""
    out = np.empty((resamples, len(diffs_by_cell)))
    for j, diffs in enumerate(diffs_by_cell):
        idx = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
        out[:, j] = np.asarray(diffs)[idx].mean(axis=1)
    return out


def mean_over_cells(diffs_by_cell: Sequence[Sequence[float]], resamples: int = 10_000,
                    seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Mean over cells of each cell's mean per-seed difference, with a stratified bootstrap
    interval (fractions)."""
    cells = [np.asarray(d, np.float64) for d in diffs_by_cell]
    means = resampled_cell_means(cells, np.random.default_rng(seed), resamples).mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": float(np.mean([c.mean() for c in cells])), "low": float(low),
            "high": float(high), "cells": len(cells)}


def gap_closed(lookahead: Sequence[Sequence[float]], planner: Sequence[Sequence[float]],
               clairvoyant: Sequence[Sequence[float]], resamples: int = 10_000, seed: int = 0,
               confidence: float = 0.95) -> dict[str, float]:
    """Share of the look-ahead -> clairvoyant gap the planner closes: the mean over cells of
    ``(lookahead - planner) / lookahead`` over the same of ``(lookahead - clairvoyant) /
    lookahead`` (per-seed mean E2E of each cell, same seeds), with a stratified bootstrap
    interval resampling the seeds (one index set for all three routers). ``gap`` is the
    denominator's mean and interval; the share is NaN when that interval reaches 0."""
    rng = np.random.default_rng(seed)
    saved = [-relative(p, la) for la, p in zip(lookahead, planner)]
    bound = [-relative(c, la) for la, c in zip(lookahead, clairvoyant)]
    s, g = np.zeros(resamples), np.zeros(resamples)
    for x, y in zip(saved, bound):
        idx = rng.integers(0, len(x), size=(resamples, len(x)))
        s += x[idx].mean(axis=1)
        g += y[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(g != 0.0, s / g, np.nan)
    gaps = g / len(saved)
    alpha = (1.0 - confidence) / 2.0
    gap_low, gap_high = np.quantile(gaps, [alpha, 1.0 - alpha])
    gap_mean = float(np.mean([y.mean() for y in bound]))
    share = float(np.mean([x.mean() for x in saved])) / gap_mean if gap_mean else float("nan")
    if gap_low <= 0.0:
        return {"share": float("nan"), "low": float("nan"), "high": float("nan"),
                "gap": gap_mean, "gap_low": float(gap_low), "gap_high": float(gap_high)}
    low, high = np.nanquantile(shares, [alpha, 1.0 - alpha])
    return {"share": share, "low": float(low), "high": float(high), "gap": gap_mean,
            "gap_low": float(gap_low), "gap_high": float(gap_high)}


def aim_at_most(low: float, high: float, bound: float) -> str:
    """Verdict on the aim "value <= bound" from the value's interval: ``"met"`` when the whole
    interval is at or below it, ``"missed"`` when the whole interval is above, else
    ``"not shown"`` (no claim while the interval contains the bound)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not shown"
    if high <= bound:
        return "met"
    if low > bound:
        return "missed"
    return "not shown"


def aim_at_least(low: float, high: float, bound: float) -> str:
    """Verdict on the aim "value >= bound" (see :func:`aim_at_most`)."""
    return aim_at_most(-high, -low, -bound)


def all_cells_verdict(verdicts: Sequence[str]) -> str:
    """One verdict for an aim every cell must meet: missed if any cell missed it, met if all
    met it, else not shown."""
    if "missed" in verdicts:
        return "missed"
    return "met" if verdicts and all(v == "met" for v in verdicts) else "not shown"


def router_summary(rows_by_cell: Mapping[str, Mapping[str, Any]], router: str
                   ) -> dict[str, Any]:
    """Gaps of ``router`` over the cells: mean vs best heuristic (with interval), the worst
    cell, mean vs look-ahead; for the planner, the share of the look-ahead -> clairvoyant gap
    it closes."""
    cells = [c for c, rows in rows_by_cell.items() if router in rows]
    rows = [rows_by_cell[c][router] for c in cells]
    best = [relative(r["e2e_mean_per_seed"], r["best_per_seed"]) for r in rows]
    out: dict[str, Any] = {"cells": cells, "vs_best": mean_over_cells(best)}
    worst = max(range(len(cells)), key=lambda i: rows[i]["vs_best"]["mean"])
    out["worst"] = {"cell": cells[worst], **rows[worst]["vs_best"]}
    cost = [r["ms_per_decision"] for r in rows]
    out["ms_per_decision"] = float(np.median(cost))
    out["ms_per_decision_range"] = [float(min(cost)), float(max(cost))]
    if all("lookahead_per_seed" in r for r in rows):
        out["vs_lookahead"] = mean_over_cells(
            [relative(r["e2e_mean_per_seed"], r["lookahead_per_seed"]) for r in rows])
    if router == PLANNER:
        both = [c for c in cells if CLAIRVOYANT in rows_by_cell[c]]
        if both:
            out["gap_closed"] = gap_closed(
                [rows_by_cell[c][PLANNER]["lookahead_per_seed"] for c in both],
                [rows_by_cell[c][PLANNER]["e2e_mean_per_seed"] for c in both],
                [rows_by_cell[c][CLAIRVOYANT]["e2e_mean_per_seed"] for c in both])
    return out


def policy_verdicts(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
                    ) -> dict[str, str]:
    """The issue's three aims for a learned policy (see the module docstring)."""
    vb, vl = summary["vs_best"], summary.get("vs_lookahead")
    return {
        "mean_vs_best<=-1.5%": aim_at_most(vb["low"], vb["high"], AIM_MEAN_VS_BEST),
        "every_cell_vs_best<=+0.5%": all_cells_verdict(
            [aim_at_most(r["vs_best"]["low"], r["vs_best"]["high"], AIM_WORST_VS_BEST)
             for r in rows]),
        "mean_vs_lookahead<=+0.5%": (aim_at_most(vl["low"], vl["high"], AIM_MEAN_VS_LOOKAHEAD)
                                     if vl else "not measured"),
    }


def planner_verdicts(summary: Mapping[str, Any]) -> dict[str, str]:
    """The issue's aim for the planner: it closes at least half the look-ahead -> clairvoyant
    gap."""
    gap = summary.get("gap_closed")
    if gap is None:
        return {"gap_closed>=50%": "not measured"}
    return {"gap_closed>=50%": aim_at_least(gap["low"], gap["high"], AIM_GAP_CLOSED)}


# --------------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def interval_text(comp: Mapping[str, Any] | None) -> str:
    """``+0.12% [-0.03%, +0.27%]`` from a mapping with ``mean``, ``low`` and ``high``
    (fractions); "–" for none."""
    if not comp:
        return "–"
    return f"{_pct(comp['mean'])} [{_pct(comp['low'])}, {_pct(comp['high'])}]"


def _word(comp: Mapping[str, Any] | None) -> str:
    """``better``/``worse`` only when the interval excludes 0."""
    return comp["verdict"] if comp else "–"


def cell_markdown(name: str, cell_result: Mapping[str, Any]) -> str:
    """One cell's table (markdown)."""
    rows = cell_result["rows"]
    groups = "; ".join(
        f"{g['seeds']}×{g['requests']}: best heuristic `{g['best_heuristic']}` "
        f"{g['best_e2e']:.3f} s" + (f", `lookahead` {g['lookahead_e2e']:.3f} s"
                                    if g.get("lookahead_e2e") is not None else "")
        for g in cell_result["groups"])
    lines = [f"#### `{name}`: {CELLS[name].label}" if name in CELLS else f"#### `{name}`", "",
             f"Episodes {groups}. Off the training family: "
             f"{'; '.join(cell_result['off_family']) or 'only in its exact load'}.", "",
             "| router | seeds × requests | E2E mean (s) | E2E p99 (s) | vs best heuristic "
             "[95% CI] | | vs `lookahead` [95% CI] | | ms/decision | clip |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for router, r in rows.items():
        clip = r["clip_share"]
        lines.append(
            f"| `{router}` | {r['seeds']}×{r['requests']} | {r['e2e_mean']:.3f} | "
            f"{r['e2e_p99']:.2f} | {interval_text(r['vs_best'])} | {_word(r['vs_best'])} | "
            f"{interval_text(r.get('vs_lookahead'))} | {_word(r.get('vs_lookahead'))} | "
            f"{r['ms_per_decision']:.2f} | {'' if not math.isfinite(clip) else f'{100 * clip:.1f}%'} |")
    return "\n".join(lines)


def summary_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The summary table and the verdict lines (markdown)."""
    lines = ["| router | cells | mean vs best heuristic [95% CI] | worst cell vs best [95% CI] "
             "| mean vs `lookahead` [95% CI] | lookahead→clairvoyant gap closed [95% CI] "
             "| ms/decision: median (range over cells) |", "|---|---|---|---|---|---|---|"]
    for router, s in summaries.items():
        gap = s.get("gap_closed")
        gap_text = "–"
        if gap:
            gap_text = (f"{100 * gap['share']:.0f}% [{100 * gap['low']:.0f}%, "
                        f"{100 * gap['high']:.0f}%] of a {interval_text({'mean': gap['gap'], 'low': gap['gap_low'], 'high': gap['gap_high']})} gap"
                        if math.isfinite(gap["share"]) else
                        f"undefined: gap {_pct(gap['gap'])} [{_pct(gap['gap_low'])}, "
                        f"{_pct(gap['gap_high'])}] not above 0")
        w = s["worst"]
        lo, hi = s.get("ms_per_decision_range", (math.nan, math.nan))
        lines.append(f"| `{router}` | {len(s['cells'])} | {interval_text(s['vs_best'])} | "
                     f"`{w['cell']}` {interval_text(w)} | {interval_text(s.get('vs_lookahead'))} | {gap_text} | "
                     f"{s['ms_per_decision']:.1f} ({lo:.1f}–{hi:.1f}) |")
    lines += ["", "Verdicts (\"met\"/\"missed\" only when the 95% interval is on one side of "
              "the bound; \"not shown\" otherwise):", ""]
    for router, s in summaries.items():
        verdicts = s.get("verdicts", {})
        if verdicts:
            lines.append(f"- `{router}`: " + "; ".join(f"{aim}: **{v}**"
                                                       for aim, v in verdicts.items()))
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    """The whole generated block: settings, summary, verdicts and every cell's table."""
    s = report["settings"]
    cpu = f", CPU {s['cpu_s'] / 60:.1f} min" if s.get("cpu_s") is not None else ""
    limit = s.get("planner_max_replicas")
    limit = f", cells of at most {limit} replicas" if limit else ""
    head = (f"Generated {s['date']} by `python -m benchmarks.generalisation "
            f"{' '.join(s['argv'])}`: {s['episodes']} seeds × {s['requests']} requests per cell "
            f"(planners: {s['planner_seeds']} × {s['planner_requests']}{limit}), first seed "
            f"{s['seed']}; {s.get('cells_done', s['cells'])} of {s['cells']} cells; wall "
            f"{s['wall_s'] / 60:.1f} min{cpu} on {s['cpus']} CPUs (load average at the end "
            f"{s['load_end']}).")
    parts = [MARK_BEGIN, "", head, "", "### Summary", "", summary_markdown(report["summary"]),
             "", "### Per cell", ""]
    for name, cell_result in report["cells"].items():
        parts += [cell_markdown(name, cell_result), ""]
    parts.append(MARK_END)
    return "\n".join(parts)


def write_markdown(path: str | Path, block: str, begin: str = MARK_BEGIN,
                   end: str = MARK_END) -> None:
    """Write ``block`` into ``path``: between the markers ``begin`` and ``end`` when the file
    has them (the prose around stays), else as the whole file."""
    target = Path(path)
    text = target.read_text() if target.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = block + "\n"
    atomic_write_text(target, text)


# ----------------------------------------------------------------------------------- main
def evaluate_cell(name: str, baselines: Mapping[str, Callable[[], Any]],
                  learned: Mapping[str, Callable[[], Any]], seeds: list[int], requests: int,
                  planner_seeds: list[int], planner_requests: int, cache: dict,
                  family: ScenarioFamilyConfig, planner_max_replicas: int | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One cell: the main group (``baselines``: heuristics and look-ahead, and ``learned``
    policies) on ``seeds`` x ``requests`` and, when ``planner_seeds``, the planner group (the
    baselines and both planners) on ``planner_seeds`` x ``planner_requests`` (not on cells
    of more than ``planner_max_replicas`` replicas); the rows with their comparisons and the
    per-seed baselines they were compared with."""
    rows: dict[str, dict[str, Any]] = {}
    summaries: list[dict[str, Any]] = []
    main_routers = {**baselines, **learned}
    groups = [(main_routers, seeds, requests, list(main_routers))]
    too_large = planner_max_replicas is not None and len(CELLS[name].gpus) > planner_max_replicas
    if planner_seeds and not too_large:
        planners = planner_routers(CELLS[name])
        groups.append(({**baselines, **planners}, planner_seeds, planner_requests,
                       list(planners)))
    for routers, group_seeds, group_requests, shown in groups:
        group = run_group(name, routers, group_seeds, group_requests, cache, progress)
        best = group.best_heuristic()
        summaries.append({"seeds": len(group_seeds), "requests": group_requests,
                          "best_heuristic": best,
                          "best_e2e": float(group.per_seed(best).mean()),
                          "lookahead_e2e": (float(group.per_seed(LOOKAHEAD).mean())
                                            if LOOKAHEAD in group.results else None)})
        for router, row in group_rows(group, shown).items():
            row["best_per_seed"] = group.per_seed(best).tolist()
            if LOOKAHEAD in group.results:
                row["lookahead_per_seed"] = group.per_seed(LOOKAHEAD).tolist()
            rows[router] = row
    return {"off_family": off_family_reasons(CELLS[name], family), "groups": summaries,
            "rows": rows}


def summarise(cells: Mapping[str, Mapping[str, Any]], routers: Sequence[str]
              ) -> dict[str, dict[str, Any]]:
    """Summary and verdicts of every learned policy and planner of ``routers``."""
    rows_by_cell = {c: r["rows"] for c, r in cells.items()}
    out: dict[str, dict[str, Any]] = {}
    for router in routers:
        if router in HEURISTICS or router == LOOKAHEAD:
            continue
        if not any(router in rows for rows in rows_by_cell.values()):
            continue
        summary = router_summary(rows_by_cell, router)
        if router == PLANNER:
            summary["verdicts"] = planner_verdicts(summary)
        elif router != CLAIRVOYANT:
            summary["verdicts"] = policy_verdicts(
                summary, [rows_by_cell[c][router] for c in summary["cells"]])
        out[router] = summary
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", default=[],
                        help="run folder (PPO, its clone and its distilled policy) or model zip "
                             "(repeatable)")
    parser.add_argument("--episodes", type=int, default=10, help="paired seeds per cell")
    parser.add_argument("--requests", type=int, default=1500, help="requests per episode")
    parser.add_argument("--planner-seeds", type=int, default=10,
                        help="paired seeds per cell of the planners (0 = no planners)")
    parser.add_argument("--planner-requests", type=int, default=200,
                        help="requests per planner episode")
    parser.add_argument("--planner-max-replicas", type=int, default=16,
                        help="no planners on larger cells (a decision forks the whole "
                             "cluster: ~0.5 s each at 32 replicas; 0 = no limit)")
    parser.add_argument("--cells", default="all", help=f"comma-separated ({', '.join(CELLS)})")
    parser.add_argument("--heuristics", default="all",
                        help=f"comma-separated subset of ({', '.join(HEURISTICS)})")
    parser.add_argument("--no-lookahead", action="store_true", help="skip the look-ahead")
    parser.add_argument("--seed", type=int, default=50_000, help="first seed")
    parser.add_argument("--out", help="write every number as JSON here")
    parser.add_argument("--markdown", help="write the tables here (between the generated-block "
                                           "markers if the file has them)")
    parser.add_argument("--from-json", help="run nothing: rebuild the tables from this --out "
                                            "file (with --markdown to rewrite a document)")
    args = parser.parse_args(argv)
    args.cells = list(CELLS) if args.cells == "all" else args.cells.split(",")
    args.heuristics = list(HEURISTICS) if args.heuristics == "all" else args.heuristics.split(",")
    for cell in args.cells:
        if cell not in CELLS:
            parser.error(f"--cells: unknown cell {cell!r} (known: {', '.join(CELLS)})")
    for name in args.heuristics:
        if name not in HEURISTICS:
            parser.error(f"--heuristics: unknown {name!r} (known: {', '.join(HEURISTICS)})")
    if args.episodes < 2 or (args.planner_seeds and args.planner_seeds < 2):
        parser.error("--episodes and --planner-seeds: at least 2 seeds for an interval "
                     "(--planner-seeds 0 skips the planners)")
    return args


def run_settings(args: argparse.Namespace, argv: list[str], wall_s: float, cpu_s: float
              ) -> dict[str, Any]:
    """The run's settings and conditions (``wall_s``/``cpu_s``: seconds of wall and of this
    process's CPU time)."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shown = [Path(a).name if Path(a).is_absolute() else a for a in argv]  # no machine paths
    return {"date": time.strftime("%Y-%m-%d"), "argv": shown, "episodes": args.episodes,
            "requests": args.requests, "planner_seeds": args.planner_seeds,
            "planner_requests": args.planner_requests,
            "planner_max_replicas": args.planner_max_replicas, "seed": args.seed,
            "cells": len(args.cells), "wall_s": wall_s, "cpu_s": cpu_s, "cpus": os.cpu_count(),
            "load_end": round(load, 1)}


def rebuild(path: str, markdown: str | None) -> dict[str, Any]:
    """Print (and with ``markdown`` write) the tables of a saved ``--out`` report, its
    summary recomputed from the per-seed numbers (the same fixed-seed bootstrap)."""
    report = json.loads(Path(path).read_text())
    report["summary"] = summarise(report["cells"], list(report["summary"]))
    text = report_markdown(report)
    print(text)
    if markdown:
        write_markdown(markdown, text)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        return rebuild(args.from_json, args.markdown)
    start, cpu_start = time.perf_counter(), time.process_time()
    baselines = baseline_routers(not args.no_lookahead, args.heuristics)
    learned = learned_routers(args.policy)
    seeds = list(range(args.seed, args.seed + args.episodes))
    planner_seeds = list(range(args.seed, args.seed + args.planner_seeds))
    family = load_family("generalist")
    cache: dict = {}
    cells: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for name in args.cells:
        cells[name] = evaluate_cell(
            name, baselines, learned, seeds, args.requests, planner_seeds,
            args.planner_requests, cache, family, args.planner_max_replicas or None,
            progress=lambda m: print("  " + m, file=sys.stderr, flush=True))
        settings = run_settings(args, argv, time.perf_counter() - start,
                             time.process_time() - cpu_start)
        report = {"settings": {**settings, "cells_done": len(cells)},
                  "summary": summarise(cells, [*learned, *PLANNERS]), "cells": cells}
        if args.out:  # after every cell: a long run interrupted keeps what it measured
            atomic_write_json(args.out, report)
    text = report_markdown(report)
    print(text, flush=True)
    if args.markdown:
        write_markdown(args.markdown, text)
    return report


if __name__ == "__main__":
    main()
