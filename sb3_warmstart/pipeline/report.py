"""The final report: trained routers against every heuristic on held-out scenarios, with plots.

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
  routers and the three best heuristics drawn thick in colour and listed first;
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
from sb3_warmstart.pipeline.envs import make_base_env, training_env_spec
from sb3_warmstart.policies.router import PolicyRouter

POLICY_NAME = "ppo"
CLONE_NAME = "bc_clone"
LEARNED_NAMES = (POLICY_NAME, CLONE_NAME)
LEARNING_CURVE_NOTE = ("points: training episodes, actions sampled (exploration, temperature "
                       "control); the results table evaluates the greedy policy on held-out "
                       "episodes")
#: At most this many training episodes are replayed with ``lor`` for the paired learning curve.
PAIRED_EPISODES = 48
#: Width of the scenario column of the results table (longer names wrap onto more lines).
SCENARIO_COLUMN = 44
#: Heuristics drawn emphasised in the latency CDF (the best by mean E2E), besides the learned.
EMPHASISED_HEURISTICS = 3


# ============================================================================ evaluation
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
    :param progress: called with the router's name after each episode.
    """
    if isinstance(spec, ScenarioFamilyConfig):
        env = ScenarioFamilyEnv(spec)
        out = []
        for seed in seeds:
            results = {}
            for name, factory in routers.items():
                metrics, latencies = run_episode(env, factory(), int(seed))
                results[name] = RouterResult(name, [metrics], [latencies.e2e])
                if progress is not None:
                    progress(name)
            out.append(HeldOutScenario(scenario_label(env.scenario), [int(seed)], results,
                                       dict(env.scenario)))
        return out
    results = evaluate_routers({"config": spec}, routers, seeds,
                               progress=None if progress is None
                               else lambda message: progress(message.split(" seed")[0]))
    return [HeldOutScenario(spec.name, [int(s) for s in seeds], results, {"name": spec.name})]


def evaluate_policy(policy_routers: Mapping[str, Any], env_kwargs: Mapping[str, Any],
                    heuristics: Sequence[str], seeds: Sequence[int],
                    progress: Callable[[str], None] | None = None) -> dict[str, RouterResult]:
    """Learned routers (name -> ``PolicyRouter``) and heuristics on the same held-out seeds.

    :param env_kwargs: ``LLMClusterEnv`` keyword arguments (``{"config": EnvConfig}`` for a
        built config).
    :param progress: called after each episode (see ``evaluate_routers``).
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
    ``lor`` (every comparison's reference). Across a family, the routers that need the
    simulator's state are left out, and the cache-aware ones unless named."""
    ev = config.evaluation
    names = list(ev.router_names)
    if config.family_config is not None:
        names = [n for n in names if not ROUTERS[n].requires_context
                 and (ev.routers or n not in CACHE_AWARE_ROUTERS)]
    if "lor" not in names:
        names.insert(0, "lor")
    return names


def learned_routers(session, pretrained=None) -> dict[str, PolicyRouter]:
    """The trained policy (``ppo``) and, after a warm start, the clone it started from
    (``bc_clone``, with the observation statistics it was cloned with)."""
    model, venv = session.model, session.venv
    learned = {POLICY_NAME: PolicyRouter(model, venv.obs_rms, name=POLICY_NAME)}
    reference = getattr(model, "reference_policy", None)
    if reference is not None:
        obs_rms = pretrained.obs_rms if pretrained is not None else venv.obs_rms
        learned[CLONE_NAME] = PolicyRouter(reference, obs_rms, name=CLONE_NAME)
    return learned


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


# ============================================================================ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_emphasised_cdf(results: Mapping[str, RouterResult], path: str | Path, *,
                     emphasised: Sequence[str], title: str = ""):
    """One E2E-latency CDF per router; returns the (closed) figure.

    The ``emphasised`` routers (the learned ones and the best heuristics) are drawn thick, in
    distinct colours, on top and first in the legend; every other router thin, in greys with
    alternating dash patterns, so the learned router stands out among a dozen or more.
    """
    plt = _pyplot()
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    front = [n for n in emphasised if n in results]
    rest = [n for n in results if n not in front]
    handles = {}
    for i, name in enumerate(rest):
        e2e = np.sort(results[name].pooled_e2e)
        if e2e.size:
            handles[name], = ax.plot(e2e, np.arange(1, e2e.size + 1) / e2e.size, label=name,
                                     color=str(0.45 + 0.35 * (i % 4) / 3),
                                     linestyle=("-", "--", ":", "-.")[(i // 4) % 4],
                                     linewidth=0.9, zorder=2)
    for i, name in enumerate(front):
        e2e = np.sort(results[name].pooled_e2e)
        if e2e.size:
            learned = name in LEARNED_NAMES
            handles[name], = ax.plot(e2e, np.arange(1, e2e.size + 1) / e2e.size, label=name,
                                     color=colors[i % len(colors)],
                                     linewidth=3.0 if learned else 2.2, zorder=4 if learned else 3)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title or "E2E latency CDF", fontsize=9)
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
                 notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the report files; returns a JSON-able summary.

    :param held_out: the held-out scenarios, or one scenario's ``router -> RouterResult``.
    :param title: the report's title (the scenario, or the family).
    :param description: what was evaluated (a line above the tables).
    :param history: the training monitor's rows (learning curve, dispatch distribution).
    :param lor_by_seed: ``lor``'s mean E2E on training episodes' seeds (the paired curve).
    :param stabilization_steps: env steps of random routing at the start (shaded).
    :param notes: ``key: value`` lines of the report (a mapping value becomes ``k=v, ...``).
    :return: ``routers`` (every router's metrics averaged over all held-out episodes),
        ``scenarios``, per learned router its averages, ``comparison``, ``table``, and the
        learning curve's numbers.
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
    summary = {"routers": {n: r.summary() for n, r in results.items()}, **summary}
    emphasised = learned + rank_heuristics(held_out, heuristics)[:EMPHASISED_HEURISTICS]
    plot_emphasised_cdf(results, folder / "latency_cdf.png", emphasised=emphasised,
                     title=f"{title}: E2E latency CDF, all requests of "
                           f"{_count(episodes_per_router, 'held-out episode')} per router "
                           "(greedy actions)")
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
    lines += ["Seconds unless a column says otherwise:", "", "```", table, "```", ""]
    if "comparison" in summary:
        c = summary["comparison"]
        lines.append(f"* PPO vs the best heuristic ({c['best_heuristic']}): "
                     f"{100 * c['ppo_vs_best_heuristic']:+.1f}% mean E2E")
        if c["ppo_vs_lor"] is not None:
            lines.append(f"* PPO vs lor: {100 * c['ppo_vs_lor']:+.1f}% mean E2E, "
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
    plots = [p for p in ("learning_curve.png", "dispatch_distribution.png", "latency_cdf.png")
             if (folder / p).exists()]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    summary["table"] = table
    return summary


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
    learned = learned_routers(session, pretrained)
    routers = router_factories(learned, report_heuristics(config))
    history = monitor.history_rows() if monitor is not None else []
    training_seeds = paired_episode_seeds(history)
    printer = ProgressPrinter("report", len(routers) * len(seeds) + len(training_seeds),
                              "episodes", enabled=progress)
    done = [0]

    def advance(message: str) -> None:
        done[0] += 1
        printer.update(done[0], message)

    held_out = evaluate_held_out(spec, routers, seeds, progress=advance)
    lor_by_seed = heuristic_on_episodes(training_env_spec(config), "lor", training_seeds,
                                        progress=advance)
    printer.close()
    seed_range = f"seeds {seeds[0]}..{seeds[-1]}"
    if family is not None:
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
                           stabilization_steps=stabilization, notes=notes)
    print(f"\n== {title}: trained policy vs heuristics. {description}")
    print(summary["table"])
    if "last_quarter_vs_lor_pct" in summary:
        shown = episodes_shown(summary["curve_episodes_shown"], summary["curve_episodes_total"])
        print(f"training episodes, last quarter: {summary['last_quarter_vs_lor_pct']:+.1f}% vs "
              f"lor on the same arrivals (sampled actions; {shown}; see "
              "report/learning_curve.png)")
    return summary
