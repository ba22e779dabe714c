"""The final report: trained routers against every heuristic on held-out scenarios, with plots.

The learned routers are the PPO policy (``ppo``), the distilled policy it started from
(``distilled``: ``<run>/pretrained/distilled_policy.zip``, when a DAgger stage wrote one) and the
behaviour clone (``bc_clone``: ``<run>/pretrained/bc_policy.zip``). Every router serves the same
held-out episodes, so every comparison is paired: the mean of the per-episode relative
differences with a 95 % bootstrap interval (:mod:`llm_cluster_env.tools.paired_stats`), and a
"better"/"worse" word only where the interval excludes 0. ``report.md`` opens with a headline:
each learned router against the best heuristic of each held-out scenario and against ``lor``,
and whether PPO improved on its start (the distilled policy, else the clone). When the replicas
cache prefixes, the headline is mean TTFT, p99 E2E, mean E2E, SLO goodput and prefix hit rate
of each learned router against every cache-aware heuristic, the held-out trace rows, and the
verdict on the prefix-caching aim (:class:`PrefixAim`).

One builder (:func:`build_report`) serves both kinds of run. A run trained across a scenario
family is evaluated on several held-out scenarios of the family (one episode each, seeds training
never drew); a run trained on one scenario is evaluated on that scenario, which is the one-row
case of the same path (:class:`HeldOutScenario`). :func:`write_report` writes, into
``<run>/report/``:

* ``results.txt``: per held-out scenario, ``lor``, the best heuristic and each learned router
  (mean E2E, seconds; the scenario's full name, wrapped), their geometric means over the
  scenarios, then every router's metrics averaged over all held-out episodes;
* ``results.csv`` (those averages), ``results.json`` (everything, JSON), ``report.md``;
* ``latency_cdf.png``: E2E latency CDF per router over all held-out requests, the learned
  routers and the three best heuristics drawn thick in colour and listed first; with prefix
  caching also ``ttft_cdf.png`` (TTFT, the learned routers and the cache-aware heuristics
  emphasised);
* with the training history: ``learning_curve.png`` (training-episode mean E2E against env
  steps, paired with ``lor`` on the same arrivals; it states how many episodes it shows) and
  ``dispatch_distribution.png`` (each replica's share of every rollout's requests).

``train/evaluate.py`` writes the same report for any saved policy on any scenario.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text
from llm_cluster_env.config import EnvConfig
from llm_cluster_env.env.family import ScenarioFamilyConfig, ScenarioFamilyEnv
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, make_router
from llm_cluster_env.tools.evaluation import (
    RouterResult,
    evaluate_routers,
    format_table,
    run_episode,
    write_csv,
)
from llm_cluster_env.tools.paired_stats import (
    NO_DIFFERENCE,
    compare_paired,
    compare_paired_absolute,
)
from sb3_warmstart.pipeline.envs import make_base_env, training_env_spec
from sb3_warmstart.policies.router import PolicyRouter, load_policy_router

POLICY_NAME = "ppo"
DISTILLED_NAME = "distilled"
CLONE_NAME = "bc_clone"
#: The learned routers, in the order of every table.
LEARNED_NAMES = (POLICY_NAME, DISTILLED_NAME, CLONE_NAME)
#: ``<run>/pretrained/<CLONE_POLICY>``: the behaviour clone the warm-start stage writes.
CLONE_POLICY = "bc_policy.zip"
LEARNING_CURVE_NOTE = ("points: training episodes, actions sampled (exploration, temperature "
                       "control); the results table evaluates the greedy policy on held-out "
                       "episodes")
#: At most this many training episodes are replayed with ``lor`` for the paired learning curve.
PAIRED_EPISODES = 48
#: Width of the scenario column of the results table (longer names wrap onto more lines).
SCENARIO_COLUMN = 44
#: Heuristics drawn emphasised in the latency CDF (the best by mean E2E), besides the learned.
EMPHASISED_HEURISTICS = 3
#: Paired episodes a comparison needs for its interval (fewer: the mean difference alone, with
#: no interval and no better/worse word).
MIN_PAIRED_EPISODES = 10
#: Coverage of the report's bootstrap intervals.
CONFIDENCE = 0.95
#: Seed of the bootstrap resampling (the same results give the same intervals).
BOOTSTRAP_SEED = 0
#: The episode metric every comparison of the headline is on (seconds).
HEADLINE_METRIC = "e2e_mean"
#: Episode metrics of the prefix-cache headline: (key, label, lower is better, difference
#: ``"relative"`` (fraction of the heuristic's value) or ``"absolute"`` (percentage points of a
#: rate, which may be 0)).
PREFIX_METRICS = (("ttft_mean", "mean TTFT", True, "relative"),
                  ("e2e_p99", "p99 E2E", True, "relative"),
                  ("e2e_mean", "mean E2E", True, "relative"),
                  ("goodput_rps", "SLO goodput", False, "relative"),
                  ("prefix_hit_rate_tokens", "prefix hit rate", False, "absolute"))
#: The episode metric whose presence marks replicas that cache prefixes.
PREFIX_MARKER = "prefix_hit_rate_tokens"


# ============================================================================ evaluation
def pooled_ttft(result: RouterResult) -> np.ndarray:
    """Every held-out request's TTFT (seconds)."""
    return result.pooled_ttft


@dataclass
class HeldOutScenario:
    """One held-out scenario of the report: every router on the same episodes (arrivals).

    :param label: the scenario's full description (tables wrap it, never cut it).
    :param seeds: the episode seeds (one per episode, shared by all routers).
    :param results: router name -> its episodes (metrics and request latencies).
    :param scenario: what the scenario is (a family's drawn parameters, or ``{"name": ...}``).
    """

    label: str
    seeds: list[int]
    results: dict[str, RouterResult]
    scenario: dict[str, Any] = field(default_factory=dict)


def scenario_label(scenario: Mapping[str, Any]) -> str:
    """A description of a drawn scenario (``ScenarioFamilyEnv.scenario``)."""
    gpus = "+".join(f"{n}x{g}" for g, n in scenario.get("gpus", {}).items())
    return (f"{gpus} {scenario.get('lengths', '')} {scenario.get('arrival', '')} "
            f"load {scenario.get('load', float('nan')):.2f}")


def evaluate_held_out(spec: EnvConfig | ScenarioFamilyConfig,
                      routers: Mapping[str, Callable[[], Any]], seeds: Sequence[int],
                      progress: Callable[[str], None] | None = None) -> list[HeldOutScenario]:
    """Every router on the held-out episodes ``seeds`` of ``spec``.

    A family draws a new scenario for every seed: one :class:`HeldOutScenario` per seed, one
    episode each (the same cluster and requests for every router). One scenario: a single
    :class:`HeldOutScenario` holding all the episodes.

    :param routers: name -> factory of the router (learned or heuristic).
    :param progress: called with a short line after each episode.
    """
    if isinstance(spec, ScenarioFamilyConfig):
        env = ScenarioFamilyEnv(spec)
        out = []
        for seed in seeds:
            results = {}
            for name, factory in routers.items():
                results[name] = RouterResult(name)
                results[name].add(*run_episode(env, factory(), int(seed)))
                if progress is not None:
                    progress(name)
            out.append(HeldOutScenario(scenario_label(env.scenario), [int(seed)], results,
                                       dict(env.scenario)))
        return out
    results = evaluate_routers({"config": spec}, routers, [int(s) for s in seeds], progress)
    return [HeldOutScenario(spec.name, [int(s) for s in seeds], results, {"name": spec.name})]


def evaluate_policy(policy_routers: Mapping[str, Any], env_kwargs: Mapping[str, Any],
                    heuristics: Sequence[str], seeds: Sequence[int],
                    progress: Callable[[str], None] | None = None) -> dict[str, RouterResult]:
    """Learned routers (name -> ``PolicyRouter``) and heuristics on the same held-out seeds.

    :param env_kwargs: ``LLMClusterEnv`` keyword arguments (``{"config": EnvConfig}`` for a
        built config).
    :param progress: called with a short line after each episode.
    """
    return evaluate_routers(env_kwargs, router_factories(policy_routers, heuristics), seeds,
                            progress=progress)


def router_factories(learned: Mapping[str, Any], heuristics: Sequence[str]
                     ) -> dict[str, Callable[[], Any]]:
    """Name -> factory: the learned routers (as they are) first, then fresh heuristics."""
    factories: dict[str, Callable[[], Any]] = {
        name: (lambda r=router: r) for name, router in learned.items()}
    factories.update({name: (lambda n=name: make_router(n)) for name in heuristics})
    return factories


def report_heuristics(config) -> list[str]:
    """The heuristics of a run's report: ``evaluation.routers`` (all when empty), always with
    ``lor`` (every comparison's reference). Across a family, the cache-aware ones are left out
    unless named, and the routers that need the simulator's state unless the report runs on
    the family's named held-out scenarios (single-scenario envs, which can serve them)."""
    ev = config.evaluation
    names = list(ev.router_names)
    family = config.family_config
    if family is not None:  # held-out family draws cannot serve routers needing the simulator
        names = [n for n in names if (family.holdout or not ROUTERS[n].requires_context)
                 and (ev.routers or n not in CACHE_AWARE_ROUTERS)]
    if "lor" not in names:
        names.insert(0, "lor")
    return names


def learned_routers(session, pretrained=None, run_dir: str | Path | None = None
                    ) -> dict[str, PolicyRouter]:
    """The learned routers of a run, in :data:`LEARNED_NAMES` order.

    * ``ppo``: the trained policy (the session's model and observation statistics);
    * ``distilled``: ``<run>/pretrained/distilled_policy.zip`` when that file exists (what PPO
      started from after DAgger);
    * ``bc_clone``: ``<run>/pretrained/bc_policy.zip`` when it exists; else, after a warm start
      that distilled nothing (an external policy), the reference policy PPO was regularised
      toward, with the observation statistics it was trained with.
    """
    from sb3_warmstart.pipeline.warm_start_stage import DISTILLED_POLICY

    model, venv = session.model, session.venv
    learned = {POLICY_NAME: PolicyRouter(model, venv.obs_rms, name=POLICY_NAME)}
    folder = Path(run_dir) / "pretrained" if run_dir is not None else None
    if folder is not None and (folder / DISTILLED_POLICY).is_file():
        learned[DISTILLED_NAME] = load_policy_router(folder / DISTILLED_POLICY,
                                                     name=DISTILLED_NAME)
    if folder is not None and (folder / CLONE_POLICY).is_file():
        learned[CLONE_NAME] = load_policy_router(folder / CLONE_POLICY, name=CLONE_NAME)
    elif DISTILLED_NAME not in learned and getattr(model, "reference_policy", None) is not None:
        obs_rms = pretrained.obs_rms if pretrained is not None else venv.obs_rms
        learned[CLONE_NAME] = PolicyRouter(model.reference_policy, obs_rms, name=CLONE_NAME)
    return learned


def start_of(learned: Sequence[str]) -> str | None:
    """The policy PPO started from among ``learned``: the distilled one, else the clone."""
    return next((n for n in (DISTILLED_NAME, CLONE_NAME) if n in learned), None)


def heuristic_on_episodes(spec: EnvConfig | ScenarioFamilyConfig, router: str,
                          seeds: Sequence[int],
                          progress: Callable[[str], None] | None = None) -> dict[int, float]:
    """Mean E2E of a heuristic on each episode seed (the same scenario and arrivals the training
    episode with that seed saw: :class:`sb3_warmstart.pipeline.envs.EpisodeSeedWrapper`)."""
    env = make_base_env(spec)
    out = {}
    for seed in seeds:
        out[int(seed)] = float(run_episode(env, make_router(router), int(seed))[0]["e2e_mean"])
        if progress is not None:
            progress(f"{router} on the training episodes")
    return out


def paired_episode_seeds(history: Sequence[Mapping[str, Any]],
                         limit: int = PAIRED_EPISODES) -> list[int]:
    """Seeds of at most ``limit`` training episodes, evenly spaced over training, that the
    report replays with ``lor`` (the paired learning curve)."""
    seeds = [int(r["episode_seed"]) for r in history
             if r.get("kind") == "episode" and "episode_seed" in r]
    if len(seeds) <= limit:
        return seeds
    picks = np.unique(np.linspace(0, len(seeds) - 1, limit).round().astype(int))
    return [seeds[i] for i in picks]


# ============================================================================ tables
def _geometric_mean(values: Sequence[float]) -> float:
    """``(prod values) ** (1/n)``: exactly the value itself for one value."""
    return float(np.prod(np.asarray(values, dtype=np.float64)) ** (1.0 / len(values)))


def pooled(scenarios: Sequence[HeldOutScenario]) -> dict[str, RouterResult]:
    """Every router's episodes of all held-out scenarios together (router order kept)."""
    out: dict[str, RouterResult] = {}
    for held_out in scenarios:
        for name, result in held_out.results.items():
            target = out.setdefault(name, RouterResult(name))
            target.episodes.extend(result.episodes)
            target.e2e.extend(result.e2e)
            target.ttft.extend(result.ttft)
    return out


def rank_heuristics(scenarios: Sequence[HeldOutScenario], heuristics: Sequence[str]
                    ) -> list[str]:
    """Heuristics from best to worst by the geometric mean of their mean E2E over the
    scenarios (every scenario weighs alike whatever its latency scale)."""
    score = {name: _geometric_mean([s.results[name].mean("e2e_mean") for s in scenarios])
             for name in heuristics}
    return sorted(heuristics, key=lambda n: score[n])


def comparison_table(scenarios: Sequence[HeldOutScenario], learned: Sequence[str]
                     ) -> tuple[str, dict[str, Any]]:
    """Per held-out scenario: ``lor``, the best heuristic and each learned router (mean E2E,
    seconds) and the learned routers' change against both; and their averages (geometric
    means of the ratios over the scenarios, so every scenario weighs alike).

    :return: the table (scenario names in full, wrapped to :data:`SCENARIO_COLUMN`) and a
        JSON-able summary: ``scenarios`` (one entry each), per learned router ``vs_lor_mean``,
        ``vs_best_mean``, ``vs_best_worst``, and ``comparison`` (``ppo`` against the best
        heuristic and ``lor``: mean and p99 E2E).
    """
    width = SCENARIO_COLUMN
    header = (f"{'scenario':<{width}} {'lor E2E':>8} {'best heuristic':>26}"
              + "".join(f" {n:>9} {'vs lor':>7} {'vs best':>8}" for n in learned))
    lines = [header, "-" * len(header)]
    ratios: dict[str, dict[str, list[float]]] = {
        n: {"lor": [], "best": [], "p99_lor": []} for n in learned}
    entries = []
    bests = []
    for held_out in scenarios:
        results = held_out.results
        heuristics = [n for n in results if n not in LEARNED_NAMES]
        lor = results["lor"].mean("e2e_mean") if "lor" in results else float("nan")
        best = min(heuristics, key=lambda n: results[n].mean("e2e_mean"))
        bests.append(best)
        best_e2e = results[best].mean("e2e_mean")
        label = textwrap.wrap(held_out.label, width) or [""]
        line = f"{label[0]:<{width}} {lor:>8.3f} {best:>17} {best_e2e:>8.3f}"
        entry: dict[str, Any] = {"seeds": held_out.seeds, "label": held_out.label,
                                 "scenario": held_out.scenario, "lor_e2e": lor,
                                 "best_heuristic": best, "best_e2e": best_e2e}
        for name in learned:
            e2e = results[name].mean("e2e_mean")
            ratios[name]["lor"].append(e2e / lor)
            ratios[name]["best"].append(e2e / best_e2e)
            if "lor" in results:
                ratios[name]["p99_lor"].append(results[name].mean("e2e_p99")
                                               / results["lor"].mean("e2e_p99"))
            entry[name] = {"e2e": e2e, "vs_lor": e2e / lor - 1.0,
                           "vs_best": e2e / best_e2e - 1.0,
                           "balance": results[name].mean("balance")}
            line += (f" {e2e:>9.3f} {100 * (e2e / lor - 1):>+6.1f}%"
                     f" {100 * (e2e / best_e2e - 1):>+7.1f}%")
        lines.append(line)
        lines += [f"  {more}" for more in label[1:]]
        entries.append(entry)
    summary: dict[str, Any] = {"scenarios": entries}
    count = _count(len(scenarios), "scenario")
    for name in learned:
        gm_lor = _geometric_mean(ratios[name]["lor"]) - 1.0
        gm_best = _geometric_mean(ratios[name]["best"]) - 1.0
        worst = float(max(ratios[name]["best"])) - 1.0
        summary[name] = {"vs_lor_mean": gm_lor, "vs_best_mean": gm_best, "vs_best_worst": worst}
        lines.append(f"{name}: {100 * gm_lor:+.1f}% vs lor and {100 * gm_best:+.1f}% vs the best "
                     f"heuristic (geometric mean over {count}); worst {100 * worst:+.1f}% vs the "
                     "best")
    if POLICY_NAME in learned:
        p99 = ratios[POLICY_NAME]["p99_lor"]
        has_lor = len(p99) == len(scenarios)
        summary["comparison"] = {
            "best_heuristic": "/".join(sorted(set(bests))),
            "ppo_vs_best_heuristic": summary[POLICY_NAME]["vs_best_mean"],
            "ppo_vs_lor": summary[POLICY_NAME]["vs_lor_mean"] if has_lor else None,
            "ppo_p99_vs_lor": _geometric_mean(p99) - 1.0 if has_lor else None,
        }
    return "\n".join(lines), summary


# ============================================================================ paired comparisons
def episode_values(held_out: HeldOutScenario, router: str, metric: str) -> list[float]:
    """``router``'s ``metric`` on each episode of ``held_out`` (the episodes' order)."""
    return [float(ep.get(metric, float("nan"))) for ep in held_out.results[router].episodes]


def paired(candidate: Sequence[float], baseline: Sequence[float], *,
           lower_is_better: bool = True, difference: str = "relative") -> dict[str, Any]:
    """A candidate against a baseline on the same episodes (one value each per episode).

    :param difference: ``"relative"``: per-episode ``(candidate - baseline) / baseline``
        (fractions; absolute differences instead when a baseline value is not > 0);
        ``"absolute"``: ``candidate - baseline`` in the metric's units.
    :return: ``mean`` (mean difference), ``low``/``high`` (its :data:`CONFIDENCE` bootstrap
        interval; ``None`` with fewer than :data:`MIN_PAIRED_EPISODES` pairs), ``episodes``,
        ``difference`` and ``verdict``: ``"better"``/``"worse"`` only when the interval
        excludes 0, else ``"no difference shown"`` (or, without an interval, why there is none).
    """
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if difference == "relative" and not np.all(b > 0):
        difference = "absolute"
    diffs = (c - b) / b if difference == "relative" else c - b
    out: dict[str, Any] = {"mean": float(np.mean(diffs)) if diffs.size else float("nan"),
                           "low": None, "high": None, "episodes": int(diffs.size),
                           "difference": difference}
    if diffs.size < MIN_PAIRED_EPISODES or not np.all(np.isfinite(diffs)):
        out["verdict"] = (f"no interval ({_count(int(diffs.size), 'paired episode')}, fewer "
                          f"than {MIN_PAIRED_EPISODES})" if np.all(np.isfinite(diffs))
                          else "no interval (a value is missing)")
        return out
    compare = compare_paired if difference == "relative" else compare_paired_absolute
    result = compare(c, b, confidence=CONFIDENCE, seed=BOOTSTRAP_SEED,
                     lower_is_better=lower_is_better)
    out.update(low=result.low, high=result.high, verdict=result.verdict)
    return out


def _coverage() -> str:
    """:data:`CONFIDENCE` in words (``95%``)."""
    return f"{100 * CONFIDENCE:.0f}%"


def has_interval(entry: Mapping[str, Any]) -> bool:
    """Whether a :func:`paired` entry has its interval."""
    return entry.get("low") is not None


def paired_text(entry: Mapping[str, Any]) -> str:
    """``-3.1% [-5.0%, -1.2%] better`` (relative) or ``+4.2 pp [...]`` (absolute differences of
    a rate, in percentage points); the verdict word only where the interval excludes 0."""
    relative = entry["difference"] == "relative"

    def fmt(x: float) -> str:
        return f"{100 * x:+.1f}%" if relative else f"{100 * x:+.1f}"

    unit = "" if relative else " pp"
    if not has_interval(entry):
        return f"{fmt(entry['mean'])}{unit} ({entry['verdict']})"
    text = f"{fmt(entry['mean'])}{unit} [{fmt(entry['low'])}, {fmt(entry['high'])}]"
    return text + (f" {entry['verdict']}" if entry["verdict"] != NO_DIFFERENCE else "")


def best_heuristic(held_out: HeldOutScenario, among: Sequence[str],
                   metric: str = HEADLINE_METRIC, lower_is_better: bool = True) -> str:
    """The router of ``among`` with the best mean ``metric`` over the scenario's episodes."""
    present = [n for n in among if n in held_out.results]
    sign = 1.0 if lower_is_better else -1.0
    return min(present, key=lambda n: sign * held_out.results[n].mean(metric))


def compare_routers(scenarios: Sequence[HeldOutScenario], candidate: str,
                    baseline: str | Callable[[HeldOutScenario], str], *,
                    metric: str = HEADLINE_METRIC, lower_is_better: bool = True,
                    difference: str = "relative") -> dict[str, Any]:
    """``candidate`` against ``baseline`` (a router, or per scenario a choice of one) on every
    held-out episode, per scenario and overall (all the scenarios' episodes as pairs).

    :return: the overall :func:`paired` entry with ``metric``, ``baseline`` (the names used)
        and ``scenarios`` (one :func:`paired` entry each, with its ``baseline``).
    """
    choose = baseline if callable(baseline) else (lambda _s: baseline)
    cand: list[float] = []
    base: list[float] = []
    per_scenario = []
    for held_out in scenarios:
        name = choose(held_out)
        c, b = episode_values(held_out, candidate, metric), episode_values(held_out, name, metric)
        cand += c
        base += b
        per_scenario.append({"baseline": name, **paired(
            c, b, lower_is_better=lower_is_better, difference=difference)})
    names = "/".join(dict.fromkeys(s["baseline"] for s in per_scenario))
    return {"metric": metric, "baseline": names,
            **paired(cand, base, lower_is_better=lower_is_better, difference=difference),
            "scenarios": per_scenario}


def improved(entry: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether PPO improved on its start, from their :func:`paired` entry (PPO the candidate):
    yes only when the interval excludes 0 in PPO's favour; the reason in words."""
    if not has_interval(entry):
        return False, f"not shown: {entry['verdict']}"
    if entry["verdict"] == "better":
        return True, f"the {_coverage()} interval lies wholly on PPO's side"
    if entry["verdict"] == "worse":
        return False, f"PPO is worse (the {_coverage()} interval excludes 0 on the other side)"
    return False, f"the {_coverage()} interval contains 0"


def headline_comparisons(scenarios: Sequence[HeldOutScenario], learned: Sequence[str]
                         ) -> dict[str, Any]:
    """Every learned router against the best heuristic of each scenario (by mean E2E) and
    against ``lor``, and PPO against its start (:func:`start_of`), all on mean E2E.

    :return: ``vs_best``/``vs_lor`` (learned name -> :func:`compare_routers`) and, when PPO
        and a start were evaluated, ``ppo_vs_start`` (with ``start``, ``improved`` and
        ``reason``, per scenario too).
    """
    def best(held_out: HeldOutScenario) -> str:
        return best_heuristic(held_out, [n for n in held_out.results if n not in LEARNED_NAMES])

    has_lor = all("lor" in s.results for s in scenarios)
    out: dict[str, Any] = {
        "metric": HEADLINE_METRIC, "confidence": CONFIDENCE,
        "vs_best": {n: compare_routers(scenarios, n, best) for n in learned},
        "vs_lor": {n: compare_routers(scenarios, n, "lor") for n in learned} if has_lor else {}}
    start = start_of(learned)
    if POLICY_NAME in learned and start is not None:
        entry = compare_routers(scenarios, POLICY_NAME, start)
        entry["start"] = start
        entry["improved"], entry["reason"] = improved(entry)
        for row in entry["scenarios"]:
            row["improved"], row["reason"] = improved(row)
        out["ppo_vs_start"] = entry
    return out


def is_prefix_run(results: Mapping[str, RouterResult]) -> bool:
    """Whether the replicas cached prefixes (the episodes report a prefix hit rate)."""
    return any(PREFIX_MARKER in ep for r in results.values() for ep in r.episodes)


@dataclass(frozen=True)
class PrefixAim:
    """The prefix-caching aim for a learned router against the best cache-aware heuristic (the
    one of least mean TTFT), as fractions of that heuristic's value (the rule of
    ``benchmarks/prefix_routing.py``).

    :param ttft_cut: mean TTFT at least this much lower, and shown lower (interval below 0).
    :param p99_slack: p99 E2E at most this much higher (mean of the paired differences).
    :param e2e_slack: mean E2E no worse: not shown higher (the interval's low end at most
        this; without an interval, the mean).
    """

    ttft_cut: float = 0.10
    p99_slack: float = 0.02
    e2e_slack: float = 0.0

    def check(self, vs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Which parts a router's entries against the best cache-aware heuristic (metric ->
        :func:`paired` entry) meet; ``met`` = all three. A TTFT entry without an interval
        cannot show the cut."""
        ttft, p99, e2e = vs["ttft_mean"], vs["e2e_p99"], vs["e2e_mean"]
        e2e_bound = e2e["low"] if has_interval(e2e) else e2e["mean"]
        out = {"ttft": bool(has_interval(ttft) and ttft["mean"] <= -self.ttft_cut
                            and ttft["high"] < 0),
               "p99": bool(p99["mean"] <= self.p99_slack),
               "e2e": bool(e2e_bound <= self.e2e_slack)}
        out["met"] = all(out.values())
        return out

    def describe(self) -> str:
        """The aim in words."""
        return (f"mean TTFT at least {100 * self.ttft_cut:.0f}% below the best cache-aware "
                f"heuristic (and shown below), p99 E2E at most {100 * self.p99_slack:+.0f}%, "
                "mean E2E not shown worse")


def prefix_comparisons(scenarios: Sequence[HeldOutScenario], learned: Sequence[str],
                       aim: PrefixAim = PrefixAim()) -> dict[str, Any] | None:
    """Each learned router against every cache-aware heuristic on :data:`PREFIX_METRICS`, and
    the aim's verdict against the best of them (least mean TTFT); ``None`` when no
    cache-aware heuristic was evaluated.

    :return: ``cache_aware`` (their names), ``best_cache_aware``, ``routers`` (learned ->
        heuristic -> metric -> :func:`compare_routers`), ``aim`` (learned -> the parts met
        against the best) and ``aim_every`` (the parts met against each of them).
    """
    results = pooled(scenarios)
    cache_aware = [n for n in CACHE_AWARE_ROUTERS if n in results]
    if not cache_aware:
        return None
    best = min(cache_aware, key=lambda n: results[n].mean("ttft_mean"))
    routers = {name: {h: {key: compare_routers(scenarios, name, h, metric=key,
                                               lower_is_better=lower, difference=diff)
                          for key, _, lower, diff in PREFIX_METRICS}
                      for h in cache_aware}
               for name in learned}
    every = {}
    for name in learned:
        checks = [aim.check(routers[name][h]) for h in cache_aware]
        every[name] = {part: all(c[part] for c in checks) for part in ("ttft", "p99", "e2e")}
        every[name]["met"] = all(every[name].values())
    return {"cache_aware": cache_aware, "best_cache_aware": best, "aim_rule": aim.describe(),
            "routers": routers,
            "aim": {name: aim.check(routers[name][best]) for name in learned},
            "aim_every": every,
            "means": {n: {key: results[n].mean(key) for key, *_ in PREFIX_METRICS}
                      for n in [*learned, *cache_aware]}}


def headline_lines(paired_summary: Mapping[str, Any]) -> list[str]:
    """The top of ``report.md``: each learned router against the best heuristic and ``lor``
    (mean E2E, 95% intervals), and whether PPO improved on its start, in words."""
    pairs = next(iter(paired_summary["vs_best"].values()), {}).get("episodes", 0)
    lines = ["## Headline: mean E2E against the heuristics", "",
             f"Mean E2E latency, paired over the same {_count(pairs, 'held-out episode')}: the "
             f"mean of the per-episode relative differences with its {_coverage()} bootstrap "
             "interval; "
             "\"better\"/\"worse\" only where the interval excludes 0 (negative = lower "
             "latency). The best heuristic is picked on these same episodes, which favours "
             "it.", "",
             "| learned router | vs the best heuristic of each scenario | vs lor |",
             "|---|---|---|"]
    for name, entry in paired_summary["vs_best"].items():
        lor = paired_summary["vs_lor"].get(name)
        lines.append(f"| {name} | {paired_text(entry)} ({entry['baseline']}) | "
                     f"{paired_text(lor) if lor else 'n/a'} |")
    lines.append("")
    start = paired_summary.get("ppo_vs_start")
    if start is not None:
        lines.append(f"**Did PPO improve on its start ({start['start']})? "
                     f"{'Yes' if start['improved'] else 'No'}**: {paired_text(start)} mean E2E "
                     f"over all {_count(start['episodes'], 'paired episode')}; "
                     f"{start['reason']}.")
        rows = start["scenarios"]
        if len(rows) > 1 and not any(has_interval(r) for r in rows):
            diffs = ", ".join(f"{100 * r['mean']:+.1f}%" for r in rows)
            lines.append(f"Per scenario: one episode each, so no per-scenario interval "
                         f"(differences: {diffs}).")
        elif len(rows) > 1:
            lines += [f"* scenario {i + 1}: {'yes' if r['improved'] else 'no'} "
                      f"({paired_text(r)}; {r['reason']})" for i, r in enumerate(rows)]
        lines.append("")
    return lines


def prefix_headline_lines(prefix: Mapping[str, Any], held_out_data: str = "") -> list[str]:
    """The prefix-cache headline: per learned router a table of :data:`PREFIX_METRICS` against
    every cache-aware heuristic (95% intervals), and the aim's verdict with its figures."""
    best = prefix["best_cache_aware"]
    labels = [label for _, label, *_ in PREFIX_METRICS]
    lines = ["## Headline: prefix caching", "",
             f"Held-out data: {held_out_data or 'the evaluation episodes (no trace rows set)'}. "
             "Paired over the same windows (episodes); relative differences except the hit "
             f"rate (percentage points); {_coverage()} bootstrap intervals; \"better\"/\"worse\" only "
             "where the interval excludes 0.", ""]
    for name, by_heuristic in prefix["routers"].items():
        lines += [f"**{name}** against each cache-aware heuristic:", "",
                  "| vs | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for heuristic, entries in by_heuristic.items():
            mark = " (best, least mean TTFT)" if heuristic == best else ""
            lines.append(f"| {heuristic}{mark} | "
                         + " | ".join(paired_text(entries[key]) for key, *_ in PREFIX_METRICS)
                         + " |")
        lines.append("")
    lines.append(f"Aim ({prefix['aim_rule']}), against {best}:")
    means = prefix["means"]
    for name, check in prefix["aim"].items():
        vs = prefix["routers"][name][best]
        parts = [f"{label} {means[name][key]:.4g} s vs {means[best][key]:.4g} s, "
                 f"{paired_text(vs[key])} ({'ok' if check[part] else 'missed'})"
                 for key, label, part in (("ttft_mean", "mean TTFT", "ttft"),
                                          ("e2e_p99", "p99 E2E", "p99"),
                                          ("e2e_mean", "mean E2E", "e2e"))]
        lines.append(f"* **{name}: aim {'met' if check['met'] else 'NOT met'}**: "
                     + "; ".join(parts))
        every = prefix.get("aim_every", {}).get(name)
        if every is not None:
            missed = [part for part in ("ttft", "p99", "e2e") if not every[part]]
            lines.append(f"  Against every cache-aware heuristic ({', '.join(prefix['cache_aware'])}"
                         f"; each half against each of them): "
                         f"{'met' if every['met'] else 'NOT met (' + ', '.join(missed) + ')'}.")
    lines += ["", "Means over the held-out windows (s; hit rate %):", "",
              "| router | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in means.items():
        cells = [f"{100 * row[k]:.1f}" if k == PREFIX_MARKER else f"{row[k]:.4g}"
                 for k, *_ in PREFIX_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


# ============================================================================ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pooled_e2e(result: RouterResult) -> np.ndarray:
    """Every held-out request's E2E latency (seconds)."""
    return result.pooled_e2e


def plot_emphasised_cdf(results: Mapping[str, RouterResult], path: str | Path, *,
                        emphasised: Sequence[str], title: str = "",
                        latencies: Callable[[RouterResult], np.ndarray] = pooled_e2e,
                        xlabel: str = "end-to-end latency (s, log scale)"):
    """One latency CDF per router (E2E, or what ``latencies`` gives); returns the (closed)
    figure.

    The ``emphasised`` routers (the learned ones and the best heuristics) are drawn thick, in
    distinct colours, on top and first in the legend; every other router thin, in greys with
    alternating dash patterns, so the learned router stands out among a dozen or more.

    :param latencies: a router's pooled latencies (seconds), e.g. :func:`pooled_ttft`.
    """
    plt = _pyplot()
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    front = [n for n in emphasised if n in results]
    rest = [n for n in results if n not in front]
    handles = {}
    for i, name in enumerate(rest):
        e2e = np.sort(latencies(results[name]))
        if e2e.size:
            handles[name], = ax.plot(e2e, np.arange(1, e2e.size + 1) / e2e.size, label=name,
                                     color=str(0.45 + 0.35 * (i % 4) / 3),
                                     linestyle=("-", "--", ":", "-.")[(i // 4) % 4],
                                     linewidth=0.9, zorder=2)
    for i, name in enumerate(front):
        e2e = np.sort(latencies(results[name]))
        if e2e.size:
            learned = name in LEARNED_NAMES
            handles[name], = ax.plot(e2e, np.arange(1, e2e.size + 1) / e2e.size, label=name,
                                     color=colors[i % len(colors)],
                                     linewidth=3.0 if learned else 2.2, zorder=4 if learned else 3)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(textwrap.fill(title or "latency CDF", 100), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    order = [n for n in front + rest if n in handles]
    ax.legend([handles[n] for n in order], order, fontsize=8, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def episode_curve(rows: Sequence[Mapping[str, Any]], window: int = 4,
                  key: str = "e2e_mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, per-step mean, moving mean)`` of training episodes.

    Episodes that end at the same env step (parallel envs with equal-length episodes end
    together) are averaged first; the moving mean then spans ``window`` such points (the first
    points average what is available).
    """
    steps = np.array([r["num_timesteps"] for r in rows], dtype=np.float64)
    values = np.array([r[key] for r in rows], dtype=np.float64)
    unique, inverse = np.unique(steps, return_inverse=True)
    means = np.bincount(inverse, weights=values) / np.bincount(inverse)
    cumulative = np.cumsum(np.insert(means, 0, 0.0))
    lo = np.maximum(np.arange(1, means.size + 1) - window, 0)
    moving = (cumulative[1:] - cumulative[lo]) / (np.arange(1, means.size + 1) - lo)
    return unique, means, moving


def relative_to_reference(rows: Sequence[Mapping[str, Any]], reference: Mapping[int, float],
                          key: str = "e2e_mean") -> list[dict[str, Any]]:
    """Episode rows with ``"vs_reference_pct"``: 100 * (value / reference's value on the same
    episode seed - 1). Rows without a seed (or a reference for it) are left out."""
    out = []
    for row in rows:
        seed = row.get("episode_seed")
        if seed is None or int(seed) not in reference or key not in row:
            continue
        out.append({**row, "vs_reference_pct": 100.0 * (row[key] / reference[int(seed)] - 1.0)})
    return out


def episodes_shown(shown: int, total: int) -> str:
    """How many of the training episodes a curve shows, in words."""
    if shown >= total:
        return f"all {total} training episodes"
    return f"{shown} of {total} training episodes (evenly spaced over training)"


def plot_learning_curve(episodes: Sequence[Mapping[str, Any]], path: str | Path, *,
                        lor_by_seed: Mapping[int, float] | None = None,
                        stabilization_steps: int = 0, title: str = "",
                        note: str = "") -> dict[str, Any]:
    """The training curve, explained on the figure itself (including how many of the training
    episodes it shows).

    With ``lor_by_seed`` (``lor``'s mean E2E on training episodes' arrivals), the curve is
    paired: each of those training episodes' mean E2E relative to ``lor`` on exactly the same
    requests, so workload noise cancels and 0 % means "as good as lor". Without it: every
    episode's absolute mean E2E. The stabilisation rollouts (random routing while the
    normaliser settles) are shaded.

    :param episodes: ``kind="episode"`` history rows (``num_timesteps``, ``e2e_mean``, and
        ``episode_seed`` for the paired curve).
    :param note: a caption line under the title (what the points are).
    :return: ``curve_episodes_shown`` and ``curve_episodes_total`` (training episodes), and
        with pairs ``last_quarter_vs_lor_pct`` (mean over the last quarter of the paired
        episodes).
    """
    plt = _pyplot()
    paired = relative_to_reference(episodes, lor_by_seed) if lor_by_seed else []
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = paired if paired else list(episodes)
    summary: dict[str, Any] = {"curve_episodes_shown": len(shown),
                               "curve_episodes_total": len(episodes)}
    points = episodes_shown(len(shown), len(episodes))
    if paired:
        steps, means, moving = episode_curve(paired, key="vs_reference_pct")
        ax.axhline(0.0, color="C3", linestyle="--", lw=1.2, label="lor on the same arrivals")
        ax.set_ylabel("mean E2E vs lor on the same requests (%)")
        tail = [r["vs_reference_pct"] for r in paired[-max(1, len(paired) // 4):]]
        summary["last_quarter_vs_lor_pct"] = float(np.mean(tail))
    elif episodes:
        steps, means, moving = episode_curve(episodes)
        ax.set_ylabel("mean E2E latency per episode (s)")
    if shown:
        ax.plot(steps, means, ".", alpha=0.35, color="C0", label=points)
        ax.plot(steps, moving, color="C0", lw=2, label="moving mean (4 points)")
    if stabilization_steps > 0:
        ax.axvspan(0, stabilization_steps, color="0.85", zorder=0,
                   label="random routing (normaliser warm-up)")
    ax.set_xlabel("env steps (routed requests)")
    caption = textwrap.fill(f"{points}; {note}" if note else points, 100)
    ax.set_title(f"{title or 'learning curve'}\n{caption}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return summary


def plot_dispatch_distribution(rollout_rows: Sequence[Mapping[str, Any]], path: str | Path,
                               title: str = "") -> None:
    """Stacked share of each replica (slot) in every rollout's dispatches over training."""
    if not rollout_rows:
        return
    plt = _pyplot()
    n = len([k for k in rollout_rows[0] if k.startswith("action_share_")])
    steps = np.array([r["num_timesteps"] for r in rollout_rows])
    shares = np.array([[r.get(f"action_share_{i}", 0.0) for i in range(n)]
                       for r in rollout_rows])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = [plt.get_cmap("tab20")(i % 20) for i in range(n)]
    ax.stackplot(steps, shares.T, labels=[f"replica {i}" for i in range(n)], alpha=0.85,
                 colors=colors)
    ax.plot(steps, [r["balance"] for r in rollout_rows], color="black", lw=1.2,
            label="balance (1 - std)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("env steps (routed requests)")
    ax.set_ylabel("share of the rollout's requests")
    ax.set_title((title or "dispatch distribution over training")
                 + f"\neach replica's share of every rollout's requests ({len(rollout_rows)} "
                 "rollouts, sampled actions)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=1 if n <= 16 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ the report
def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(folder: str | Path,
                 held_out: Sequence[HeldOutScenario] | Mapping[str, RouterResult], *,
                 title: str, description: str = "",
                 history: Sequence[Mapping[str, Any]] = (),
                 lor_by_seed: Mapping[int, float] | None = None, stabilization_steps: int = 0,
                 notes: Mapping[str, Any] | None = None,
                 held_out_data: str = "") -> dict[str, Any]:
    """Write the report files; returns a JSON-able summary.

    :param held_out: the held-out scenarios, or one scenario's ``router -> RouterResult``.
    :param title: the report's title (the scenario, or the family).
    :param description: what was evaluated (a line above the tables).
    :param history: the training monitor's rows (learning curve, dispatch distribution).
    :param lor_by_seed: ``lor``'s mean E2E on training episodes' seeds (the paired curve).
    :param stabilization_steps: env steps of random routing at the start (shaded).
    :param notes: ``key: value`` lines of the report (a mapping value becomes ``k=v, ...``).
    :param held_out_data: what the held-out episodes replay (e.g. the trace rows), named in the
        prefix-cache headline.
    :return: ``routers`` (every router's metrics averaged over all held-out episodes),
        ``scenarios``, per learned router its averages, ``comparison``, ``paired``
        (:func:`headline_comparisons`), with prefix caching ``prefix``
        (:func:`prefix_comparisons`), ``headline`` (its lines), ``table``, and the learning
        curve's numbers.
    """
    if isinstance(held_out, Mapping):
        held_out = [HeldOutScenario(title, [], dict(held_out))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = pooled(held_out)
    learned = [n for n in LEARNED_NAMES if n in results]
    heuristics = [n for n in results if n not in LEARNED_NAMES]
    comparison, summary = comparison_table(held_out, learned)
    episodes_per_router = len(next(iter(results.values())).episodes) if results else 0
    metrics_table = format_table(results)
    pooled_note = (f" of {len(held_out)} scenarios (their latency scales differ: the table "
                   "above compares the routers scenario by scenario)" if len(held_out) > 1 else "")
    table = (f"{comparison}\n\nEvery router, averaged over "
             f"{_count(episodes_per_router, 'held-out episode')}{pooled_note}:\n{metrics_table}")
    atomic_write_text(folder / "results.txt", table + "\n")
    write_csv(results, folder / "results.csv")
    summary = {"routers": {n: r.summary() for n, r in results.items()}, **summary,
               "paired": headline_comparisons(held_out, learned)}
    headline = headline_lines(summary["paired"])
    prefix = prefix_comparisons(held_out, learned) if is_prefix_run(results) else None
    if prefix is not None:
        summary["prefix"] = {**prefix, "held_out_data": held_out_data}
        headline = prefix_headline_lines(prefix, held_out_data) + headline
    summary["headline"] = headline
    emphasised = learned + rank_heuristics(held_out, heuristics)[:EMPHASISED_HEURISTICS]
    requests = f"all requests of {_count(episodes_per_router, 'held-out episode')} per router"
    plot_emphasised_cdf(results, folder / "latency_cdf.png", emphasised=emphasised,
                        title=f"{title}: E2E latency CDF, {requests} (greedy actions)")
    if prefix is not None:
        plot_emphasised_cdf(results, folder / "ttft_cdf.png",
                            emphasised=learned + prefix["cache_aware"], latencies=pooled_ttft,
                            xlabel="time to first token (s, log scale)",
                            title=f"{title}: TTFT CDF, {requests} (greedy actions)")
    episodes = [r for r in history if r.get("kind") == "episode" and "e2e_mean" in r]
    rollouts = [r for r in history if r.get("kind") == "rollout"]
    curve: dict[str, Any] = {}
    if episodes:
        curve = plot_learning_curve(
            episodes, folder / "learning_curve.png", lor_by_seed=lor_by_seed,
            stabilization_steps=stabilization_steps, title=f"{title}: learning curve",
            note=LEARNING_CURVE_NOTE)
        summary.update(curve)
    if rollouts:
        plot_dispatch_distribution(rollouts, folder / "dispatch_distribution.png",
                                   title=f"{title}: dispatch distribution over training")
    atomic_write_json(folder / "results.json", summary)
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [*headline, "## Results", "",
              "Seconds unless a column says otherwise:", "", "```", table, "```", ""]
    if "comparison" in summary:
        c = summary["comparison"]
        lines.append(f"* the table's ratios of means (geometric mean over the scenarios): PPO "
                     f"vs the best heuristic ({c['best_heuristic']}) "
                     f"{100 * c['ppo_vs_best_heuristic']:+.1f}% mean E2E")
        if c["ppo_vs_lor"] is not None:
            lines.append(f"* the same, PPO vs lor: {100 * c['ppo_vs_lor']:+.1f}% mean E2E, "
                         f"{100 * c['ppo_p99_vs_lor']:+.1f}% p99 E2E")
    if episodes:
        shown = episodes_shown(curve["curve_episodes_shown"], curve["curve_episodes_total"])
        if "last_quarter_vs_lor_pct" in curve:
            lines.append(f"* learning curve: {shown}, each against lor on the same arrivals; "
                         f"last quarter {curve['last_quarter_vs_lor_pct']:+.1f}% mean E2E vs "
                         "lor (actions sampled while exploring; the table above is the greedy "
                         "policy on held-out episodes)")
        else:
            lines.append(f"* learning curve: {shown}, mean E2E per episode")
    for key, value in (notes or {}).items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
        lines.append(f"* {key}: {_fmt(value)}")
    plots = [p for p in ("learning_curve.png", "dispatch_distribution.png") if (folder / p).exists()]
    cdfs = [p for p in ("latency_cdf.png", "ttft_cdf.png") if (folder / p).exists()]
    lines += ["", *[f"![{p}]({p})" for p in plots], " ".join(f"![{p}]({p})" for p in cdfs), ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    summary["table"] = table
    return summary


def held_out_data(spec: EnvConfig | ScenarioFamilyConfig,
                  training: EnvConfig | ScenarioFamilyConfig | None = None) -> str:
    """The trace rows a one-scenario evaluation replays, and those training replayed:
    ``trace rows 8400..12030 of <file> (training: rows 0..8399)``; ``""`` without trace rows."""
    workload = getattr(spec, "workload", None)
    rows = getattr(workload, "trace_rows", None)
    if rows is None:
        return ""
    trace = Path(workload.trace_path).name if workload.trace_path else "the trace"
    trained = getattr(getattr(training, "workload", None), "trace_rows", None)
    seen = (f"training: rows {trained[0]}..{trained[1] - 1}" if trained is not None
            else "training windows may start anywhere in the trace")
    return f"trace rows {rows[0]}..{rows[1] - 1} of {trace} ({seen})"


def holdout_data(configs: Sequence[EnvConfig], family) -> str:
    """The trace rows the family's held-out scenarios replay, with the rows its training
    windows come from: ``prefix_holdout_mooncake: trace rows 8400..12030 of <file> (training
    windows: rows 0..8399)``; the scenarios without trace rows are named as generated."""
    trained = [c.trace_rows for c in family.workloads if c.kind == "trace"]
    seen = ("training windows: " + ", ".join(f"rows {a}..{b - 1}" for a, b in trained)
            if trained else "the family replays no trace")
    parts = []
    for config in configs:
        rows = config.workload.trace_rows
        if rows is None:
            parts.append(f"{config.name}: generated")
        else:
            trace = Path(config.workload.trace_path).name if config.workload.trace_path else \
                "the trace"
            parts.append(f"{config.name}: trace rows {rows[0]}..{rows[1] - 1} of {trace} "
                         f"({seen})")
    return "; ".join(parts)


def family_holdout_configs(family, episode_requests: int | None) -> list[EnvConfig]:
    """The scenarios a family leaves out for validation (``family.holdout``), each built in the
    family's observation layout (so the family's policy can route them) with
    ``episode_requests`` requests (``None``: the scenario's own); empty without a family or a
    holdout."""
    if family is None or not family.holdout:
        return []
    out = []
    for name in family.holdout:
        overrides: dict[str, Any] = {"observation": {"replica_slots": family.replica_slots}}
        if episode_requests is not None:
            overrides["episode_requests"] = episode_requests
        out.append(EnvConfig.from_kwargs(scenario=name, **overrides))
    return out


def build_report(run_dir: str | Path, config, session, monitor, *, pretrained=None,
                 timings: Mapping[str, float] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """The pipeline's final stage: evaluate, print the table, write ``<run>/report``.

    Held-out episodes (seeds ``evaluation.seed`` on, which training never draws) of the run's
    family (a new scenario each) or of its evaluation scenario, with
    ``evaluation.episode_requests`` requests; the learned routers and
    :func:`report_heuristics` on each; ``lor`` replayed on the training episodes of the
    learning curve.
    """
    from sb3_warmstart.pipeline.progress import ProgressPrinter

    ev = config.evaluation
    family = config.family_config
    spec = family if family is not None else config.evaluation_env
    if ev.episode_requests is not None:
        spec = dataclasses.replace(spec, episode_requests=ev.episode_requests)
    seeds = list(range(ev.seed, ev.seed + ev.episodes))
    learned = learned_routers(session, pretrained, run_dir)
    routers = router_factories(learned, report_heuristics(config))
    history = monitor.history_rows() if monitor is not None else []
    training_seeds = paired_episode_seeds(history)
    printer = ProgressPrinter("report", len(routers) * len(seeds) + len(training_seeds),
                              "episodes", enabled=progress)
    done = [0]

    def advance(message: str) -> None:
        done[0] += 1
        printer.update(done[0], message)

    holdout_specs = family_holdout_configs(family, ev.episode_requests)
    if holdout_specs:  # the family names scenarios it never draws: validate on those
        held_out = [scenario for held in holdout_specs
                    for scenario in evaluate_held_out(held, routers, seeds, progress=advance)]
    else:
        held_out = evaluate_held_out(spec, routers, seeds, progress=advance)
    lor_by_seed = heuristic_on_episodes(training_env_spec(config), "lor", training_seeds,
                                        progress=advance)
    printer.close()
    seed_range = f"seeds {seeds[0]}..{seeds[-1]}"
    if holdout_specs:
        title = f"family {family.name}"
        description = (f"the {len(holdout_specs)} scenarios the family leaves out "
                       f"({', '.join(h.name for h in holdout_specs)}), "
                       f"{_count(len(seeds), 'paired episode')} each ({seed_range}), greedy "
                       "actions.")
    elif family is not None:
        title = f"family {family.name}"
        description = (f"{len(seeds)} held-out scenarios drawn from the family ({seed_range}), "
                       f"one episode of {spec.episode_requests} requests each, greedy actions.")
    else:
        title = config.env_kwargs.get("scenario", "custom")
        description = (f"{_count(len(seeds), 'held-out episode')} of {spec.name} ({seed_range}) of "
                       f"{spec.episode_requests} requests, greedy actions.")
    notes: dict[str, Any] = {"ppo env steps": int(session.model.num_timesteps)}
    if pretrained is not None:
        notes["warm start"] = {k: pretrained.summary.get(k) for k in
                               ("val_accuracy", "val_tie_accuracy", "fine_tuned",
                                "input_scaling_decisions_at_clip")
                               if k in pretrained.summary}
    if timings:
        notes["wall time (s)"] = {k: round(v, 1) for k, v in timings.items()}
    rollout = config.ppo.rollout_steps
    stabilization = -(-config.stabilization.stabilization_steps // rollout) * rollout
    summary = write_report(Path(run_dir) / "report", held_out, title=title,
                           description=description, history=history, lor_by_seed=lor_by_seed,
                           stabilization_steps=stabilization, notes=notes,
                           held_out_data=(holdout_data(holdout_specs, family) if holdout_specs
                                          else held_out_data(spec, training_env_spec(config))))
    print(f"\n== {title}: trained policy vs heuristics. {description}")
    print("\n".join(summary["headline"]))
    print(summary["table"])
    if "last_quarter_vs_lor_pct" in summary:
        shown = episodes_shown(summary["curve_episodes_shown"], summary["curve_episodes_total"])
        print(f"training episodes, last quarter: {summary['last_quarter_vs_lor_pct']:+.1f}% vs "
              f"lor on the same arrivals (sampled actions; {shown}; see "
              "report/learning_curve.png)")
    return summary
