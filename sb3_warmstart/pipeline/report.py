"""The final report: a trained policy against every heuristic on held-out seeds, with plots.

Written into ``<run>/report/``: ``results.txt`` (the table), ``results.csv``, ``results.json``,
``report.md``, ``latency_cdf.png`` (E2E latency CDF per router), and when the training history
is known ``learning_curve.png`` (training-episode mean E2E against env steps, with ``lor`` on
the same episodes as a reference) and ``dispatch_distribution.png`` (each replica's share of
every rollout's requests over training). ``train/evaluate.py`` writes the same report for any
saved policy on any scenario.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text
from llm_cluster_env.config import EnvConfig
from llm_cluster_env.tools.evaluation import (
    RouterResult,
    evaluate_routers,
    format_table,
    plot_latency_cdf,
    run_episode,
    write_csv,
)
from llm_cluster_env.env.family import ScenarioFamilyConfig, ScenarioFamilyEnv
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, make_router
from sb3_warmstart.pipeline.envs import make_base_env, training_env_spec
from sb3_warmstart.policies.router import PolicyRouter

POLICY_NAME = "ppo"
CLONE_NAME = "bc_clone"
LEARNING_CURVE_NOTE = ("points: training episodes, actions sampled (exploration, temperature "
                       "control); the results table evaluates the greedy policy on held-out "
                       "episodes")


def evaluate_policy(policy_routers: Mapping[str, Any], env_kwargs: Mapping[str, Any],
                    heuristics: Sequence[str], seeds: Sequence[int],
                    progress: Callable[[str], None] | None = None) -> dict[str, RouterResult]:
    """Learned routers (name -> ``PolicyRouter``) and heuristics on the same held-out seeds.

    :param env_kwargs: ``LLMClusterEnv`` keyword arguments (``{"config": EnvConfig}`` for a
        built config).
    :param progress: called after each episode (see ``evaluate_routers``).
    """
    factories = {name: (lambda r=router: r) for name, router in policy_routers.items()}
    factories.update({name: (lambda n=name: make_router(n)) for name in heuristics})
    return evaluate_routers(env_kwargs, factories, seeds, progress=progress)


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


def plot_learning_curve(episodes: Sequence[Mapping[str, Any]], path: str | Path, *,
                        lor_by_seed: Mapping[int, float] | None = None,
                        stabilization_steps: int = 0, title: str = "",
                        note: str = "") -> dict[str, float]:
    """The training curve, explained on the figure itself.

    With ``lor_by_seed`` (``lor``'s mean E2E on each training episode's arrivals), the curve is
    paired: each training episode's mean E2E relative to ``lor`` on exactly the same requests,
    so workload noise cancels and 0 % means "as good as lor". Without it: absolute mean E2E.
    The stabilisation rollouts (random routing while the normaliser settles) are shaded.

    :param episodes: ``kind="episode"`` history rows (``num_timesteps``, ``e2e_mean``, and
        ``episode_seed`` for the paired curve).
    :param note: a caption line under the title (what the points are).
    :return: ``{"last_quarter_vs_lor_pct": ...}`` (mean over the last quarter of the paired
        episodes), empty without pairs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = relative_to_reference(episodes, lor_by_seed) if lor_by_seed else []
    fig, ax = plt.subplots(figsize=(8, 5))
    summary: dict[str, float] = {}
    if paired:
        steps, means, moving = episode_curve(paired, key="vs_reference_pct")
        ax.plot(steps, means, ".", alpha=0.35, color="C0", label="training episodes")
        ax.plot(steps, moving, color="C0", lw=2, label="moving mean (4 points)")
        ax.axhline(0.0, color="C3", linestyle="--", lw=1.2, label="lor on the same arrivals")
        ax.set_ylabel("mean E2E vs lor on the same requests (%)")
        tail = [r["vs_reference_pct"] for r in paired[-max(1, len(paired) // 4):]]
        summary["last_quarter_vs_lor_pct"] = float(np.mean(tail))
    elif episodes:
        steps, means, moving = episode_curve(episodes)
        ax.plot(steps, means, ".", alpha=0.35, color="C0", label="training episodes")
        ax.plot(steps, moving, color="C0", lw=2, label="moving mean (4 points)")
        ax.set_ylabel("mean E2E latency per episode (s)")
    if stabilization_steps > 0:
        ax.axvspan(0, stabilization_steps, color="0.85", zorder=0,
                   label="random routing (normaliser warm-up)")
    ax.set_xlabel("env steps (routed requests)")
    caption = "\n" + textwrap.fill(note, 100) if note else ""
    ax.set_title((title or "learning curve") + caption, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return summary


def plot_dispatch_distribution(rollout_rows: Sequence[Mapping[str, Any]], path: str | Path,
                               title: str = "") -> None:
    """Stacked share of each replica in every rollout's dispatches over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rollout_rows:
        return
    n = len([k for k in rollout_rows[0] if k.startswith("action_share_")])
    steps = np.array([r["num_timesteps"] for r in rollout_rows])
    shares = np.array([[r[f"action_share_{i}"] for i in range(n)] for r in rollout_rows])
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
                 + "\neach replica's share of every rollout's requests (sampled actions)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=1 if n <= 16 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: At most this many training episodes are replayed with ``lor`` for the paired learning curve.
PAIRED_EPISODES = 48


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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(folder: str | Path, results: Mapping[str, RouterResult], *, title: str,
                 history: Sequence[Mapping[str, Any]] = (),
                 lor_by_seed: Mapping[int, float] | None = None, stabilization_steps: int = 0,
                 notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the report files; returns a JSON-able summary (per-router means, comparisons).

    :param lor_by_seed: ``lor``'s mean E2E on each training episode's seed (paired curve).
    :param stabilization_steps: env steps of random routing at the start (shaded).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    atomic_write_text(folder / "results.txt", table + "\n")
    write_csv(results, folder / "results.csv")
    summary: dict[str, Any] = {"routers": {n: r.summary() for n, r in results.items()}}
    heuristics = {n: r for n, r in results.items() if n not in (POLICY_NAME, CLONE_NAME)}
    if POLICY_NAME in results and heuristics:
        best = min(heuristics, key=lambda n: heuristics[n].mean("e2e_mean"))
        ppo = results[POLICY_NAME].mean("e2e_mean")
        summary["comparison"] = {
            "best_heuristic": best,
            "ppo_vs_best_heuristic": ppo / heuristics[best].mean("e2e_mean") - 1.0,
            "ppo_vs_lor": (ppo / results["lor"].mean("e2e_mean") - 1.0
                           if "lor" in results else None),
            "ppo_p99_vs_lor": (results[POLICY_NAME].mean("e2e_p99")
                               / results["lor"].mean("e2e_p99") - 1.0
                               if "lor" in results else None),
        }
    atomic_write_json(folder / "results.json", summary)
    episodes_per_router = len(next(iter(results.values())).episodes) if results else 0
    plot_latency_cdf(results, folder / "latency_cdf.png",
                     title=f"{title}: E2E latency CDF, all requests of {episodes_per_router} "
                           "held-out episodes per router (deterministic actions)")
    episodes = [r for r in history if r.get("kind") == "episode" and "e2e_mean" in r]
    rollouts = [r for r in history if r.get("kind") == "rollout"]
    curve: dict[str, float] = {}
    if episodes:
        curve = plot_learning_curve(
            episodes, folder / "learning_curve.png", lor_by_seed=lor_by_seed,
            stabilization_steps=stabilization_steps, title=f"{title}: learning curve",
            note=LEARNING_CURVE_NOTE)
        summary.update(curve)
    if rollouts:
        plot_dispatch_distribution(rollouts, folder / "dispatch_distribution.png",
                                   title=f"{title}: dispatch distribution over training")
    lines = [f"# {title}", "", "Mean over held-out episodes (seconds unless stated):", "",
             "```", table, "```", ""]
    if "comparison" in summary:
        c = summary["comparison"]
        lines += [f"* PPO vs the best heuristic ({c['best_heuristic']}): "
                  f"{100 * c['ppo_vs_best_heuristic']:+.1f}% mean E2E"]
        if c["ppo_vs_lor"] is not None:
            lines += [f"* PPO vs lor: {100 * c['ppo_vs_lor']:+.1f}% mean E2E, "
                      f"{100 * c['ppo_p99_vs_lor']:+.1f}% p99 E2E"]
    if "last_quarter_vs_lor_pct" in curve:
        lines += [f"* training episodes, last quarter: {curve['last_quarter_vs_lor_pct']:+.1f}% "
                  "mean E2E vs lor on the same arrivals (actions sampled while exploring; the "
                  "table above is the greedy policy on held-out episodes)"]
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


def scenario_label(scenario: Mapping[str, Any]) -> str:
    """A short description of a drawn scenario (``ScenarioFamilyEnv.scenario``)."""
    gpus = "+".join(f"{n}x{g}" for g, n in scenario.get("gpus", {}).items())
    return (f"{gpus} {scenario.get('lengths', '')} {scenario.get('arrival', '')} "
            f"load {scenario.get('load', float('nan')):.2f}")


def evaluate_family(routers: Mapping[str, Callable[[], Any]], family: ScenarioFamilyConfig,
                    seeds: Sequence[int], progress: Callable[[str], None] | None = None
                    ) -> list[dict[str, Any]]:
    """Every router on the scenario each seed draws from ``family`` (one episode each, the
    same cluster and requests for every router): per seed, the scenario and each router's
    episode metrics."""
    env = ScenarioFamilyEnv(family)
    out = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": int(seed), "routers": {}}
        for name, factory in routers.items():
            metrics, _ = run_episode(env, factory(), int(seed))
            row["routers"][name] = metrics
            if progress is not None:
                progress(f"{name} seed {seed}")
        row["scenario"] = dict(env.scenario)
        out.append(row)
    return out


def family_table(rows: Sequence[Mapping[str, Any]], heuristics: Sequence[str],
                 learned: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Per held-out scenario: ``lor``, the best heuristic and each learned router (mean E2E,
    seconds) and the learned routers' change against both; and their averages (geometric
    means of the ratios, so every scenario weighs alike whatever its latency scale)."""
    header = (f"{'scenario':<58} {'lor E2E':>8} {'best heuristic':>26}"
              + "".join(f" {n:>9} {'vs lor':>7} {'vs best':>8}" for n in learned))
    lines = [header, "-" * len(header)]
    ratios: dict[str, dict[str, list[float]]] = {n: {"lor": [], "best": []} for n in learned}
    scenarios = []
    for row in rows:
        metrics = row["routers"]
        lor = metrics["lor"]["e2e_mean"]
        best = min(heuristics, key=lambda n: metrics[n]["e2e_mean"])
        best_e2e = metrics[best]["e2e_mean"]
        line = f"{scenario_label(row['scenario'])[:58]:<58} {lor:>8.3f} {best:>17} {best_e2e:>8.3f}"
        entry = {"seed": row["seed"], "scenario": row["scenario"], "lor_e2e": lor,
                 "best_heuristic": best, "best_e2e": best_e2e}
        for name in learned:
            e2e = metrics[name]["e2e_mean"]
            ratios[name]["lor"].append(e2e / lor)
            ratios[name]["best"].append(e2e / best_e2e)
            entry[name] = {"e2e": e2e, "vs_lor": e2e / lor - 1.0, "vs_best": e2e / best_e2e - 1.0,
                           "balance": metrics[name].get("balance")}
            line += f" {e2e:>9.3f} {100 * (e2e / lor - 1):>+6.1f}% {100 * (e2e / best_e2e - 1):>+7.1f}%"
        lines.append(line)
        scenarios.append(entry)
    summary: dict[str, Any] = {"scenarios": scenarios}
    for name in learned:
        gm_lor = float(np.exp(np.mean(np.log(ratios[name]["lor"])))) - 1.0
        gm_best = float(np.exp(np.mean(np.log(ratios[name]["best"])))) - 1.0
        worst = float(max(ratios[name]["best"])) - 1.0
        summary[name] = {"vs_lor_mean": gm_lor, "vs_best_mean": gm_best, "vs_best_worst": worst}
        lines.append(f"{name}: {100 * gm_lor:+.1f}% vs lor and {100 * gm_best:+.1f}% vs the best "
                     f"heuristic on average (geometric mean over {len(rows)} scenarios); worst "
                     f"{100 * worst:+.1f}% vs the best")
    return "\n".join(lines), summary


def build_family_report(run_dir: Path, config, learned: Mapping[str, Any],
                        history: Sequence[Mapping[str, Any]], *, num_timesteps: int,
                        pretrained=None, timings: Mapping[str, float] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """The report of a run trained across a scenario family: held-out scenarios of the family
    (seeds training never drew), every observation-only heuristic and the learned routers."""
    from sb3_warmstart.pipeline.progress import ProgressPrinter

    ev = config.evaluation
    family = config.family_config
    if ev.episode_requests is not None:
        family = dataclasses.replace(family, episode_requests=ev.episode_requests)
    seeds = list(range(ev.seed, ev.seed + ev.episodes))
    heuristics = [n for n in ev.router_names if not ROUTERS[n].requires_context
                  and (ev.routers or n not in CACHE_AWARE_ROUTERS)]
    if "lor" not in heuristics:
        heuristics.insert(0, "lor")
    routers = {name: (lambda r=router: r) for name, router in learned.items()}
    routers.update({name: (lambda n=name: make_router(n)) for name in heuristics})
    training_seeds = paired_episode_seeds(history)
    printer = ProgressPrinter("report", len(routers) * len(seeds) + len(training_seeds),
                              "episodes", enabled=progress)
    done = [0]

    def advance(message: str) -> None:
        done[0] += 1
        printer.update(done[0], message.split(" seed")[0])

    rows = evaluate_family(routers, family, seeds, progress=advance)
    lor_by_seed = heuristic_on_episodes(config.family_config, "lor", training_seeds,
                                        progress=advance)
    printer.close()
    table, summary = family_table(rows, heuristics, list(learned))
    folder = Path(run_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.txt", table + "\n")
    atomic_write_json(folder / "results.json", summary)
    title = f"family {family.name}"
    lines = [f"# {title}", "", f"{len(seeds)} held-out scenarios drawn from the family (seeds "
             f"{seeds[0]}..{seeds[-1]}), {family.episode_requests} requests each, greedy "
             "actions; mean E2E in seconds:", "", "```", table, "```", ""]
    if history:
        rollout = config.ppo.rollout_steps
        stabilization = -(-config.stabilization.stabilization_steps // rollout) * rollout
        episodes = [r for r in history if r.get("kind") == "episode" and "e2e_mean" in r]
        curve = plot_learning_curve(
            episodes, folder / "learning_curve.png", lor_by_seed=lor_by_seed,
            stabilization_steps=stabilization, title=f"{title}: learning curve",
            note=LEARNING_CURVE_NOTE + " (a new scenario of the family every episode)")
        summary.update(curve)
        if "last_quarter_vs_lor_pct" in curve:
            lines += [f"* training episodes, last quarter: {curve['last_quarter_vs_lor_pct']:+.1f}% "
                      "mean E2E vs lor on the same scenarios and arrivals (actions sampled)"]
    lines.append(f"* ppo env steps: {num_timesteps}")
    if pretrained is not None:
        lines.append("* warm start: " + ", ".join(
            f"{k}={_fmt(pretrained.summary.get(k))}" for k in
            ("val_accuracy", "val_tie_accuracy", "input_scaling_decisions_at_clip")
            if k in pretrained.summary))
    if timings:
        lines.append("* wall time (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    if (folder / "learning_curve.png").exists():
        lines += ["", "![learning_curve.png](learning_curve.png)", ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    summary["table"] = table
    print(f"\n== {title}: trained policy vs heuristics on {len(seeds)} held-out scenarios")
    print(table)
    return summary


def build_report(run_dir: str | Path, config, session, monitor, *, pretrained=None,
                 timings: Mapping[str, float] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """The pipeline's final stage: evaluate, print the table, write ``<run>/report``."""
    from sb3_warmstart.pipeline.progress import ProgressPrinter

    run_dir = Path(run_dir)
    ev = config.evaluation
    if config.family_config is not None:
        model = session.model
        learned = {POLICY_NAME: PolicyRouter(model, None, name=POLICY_NAME)}
        if getattr(model, "reference_policy", None) is not None:
            learned[CLONE_NAME] = PolicyRouter(model.reference_policy, None, name=CLONE_NAME)
        history = monitor.history_rows() if monitor is not None else []
        return build_family_report(run_dir, config, learned, history,
                                   num_timesteps=int(model.num_timesteps), pretrained=pretrained,
                                   timings=timings, progress=progress)
    env_config = config.evaluation_env
    if ev.episode_requests is not None:
        env_config = dataclasses.replace(env_config, episode_requests=ev.episode_requests)
    seeds = list(range(ev.seed, ev.seed + ev.episodes))
    model, venv = session.model, session.venv
    learned = {POLICY_NAME: PolicyRouter(model, venv.obs_rms, name=POLICY_NAME)}
    reference = getattr(model, "reference_policy", None)
    if reference is not None:
        obs_rms = pretrained.obs_rms if pretrained is not None else venv.obs_rms
        learned[CLONE_NAME] = PolicyRouter(reference, obs_rms, name=CLONE_NAME)
    history = monitor.history_rows() if monitor is not None else []
    training_seeds = paired_episode_seeds(history)
    names = [*learned, *ev.router_names]
    printer = ProgressPrinter("report", len(names) * len(seeds) + len(training_seeds),
                              "episodes", enabled=progress)
    done = [0]

    def advance(message: str) -> None:
        done[0] += 1
        printer.update(done[0], message.split(":")[0])

    results = evaluate_policy(learned, {"config": env_config}, ev.router_names, seeds,
                              progress=advance)
    lor_by_seed = heuristic_on_episodes(training_env_spec(config), "lor", training_seeds,
                                        progress=advance)
    printer.close()
    scenario = config.env_kwargs.get("scenario", "custom")
    notes: dict[str, Any] = {"evaluation": f"{ev.episodes} held-out episodes (seeds {seeds[0]}.."
                             f"{seeds[-1]}) of {env_config.episode_requests} requests",
                             "ppo env steps": int(model.num_timesteps)}
    if pretrained is not None:
        notes["warm start"] = {k: pretrained.summary.get(k) for k in
                               ("val_accuracy", "val_tie_accuracy", "fine_tuned")
                               if k in pretrained.summary}
    if timings:
        notes["wall time (s)"] = {k: round(v, 1) for k, v in timings.items()}
    rollout = config.ppo.rollout_steps
    stabilization = -(-config.stabilization.stabilization_steps // rollout) * rollout
    summary = write_report(run_dir / "report", results, title=f"{scenario}", history=history,
                           lor_by_seed=lor_by_seed, stabilization_steps=stabilization,
                           notes=notes)
    print(f"\n== {scenario}: trained policy vs heuristics ({len(seeds)} held-out episodes, "
          "greedy actions)")
    print(summary["table"])
    if "last_quarter_vs_lor_pct" in summary:
        print(f"training episodes, last quarter: {summary['last_quarter_vs_lor_pct']:+.1f}% vs "
              "lor on the same arrivals (sampled actions; see report/learning_curve.png)")
    return summary
