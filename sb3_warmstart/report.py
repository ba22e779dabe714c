"""The final report: a trained policy against every heuristic on held-out seeds, with plots.

Written into ``<run>/report/``: ``results.txt`` (the table), ``results.csv``, ``results.json``,
``report.md``, ``latency_cdf.png`` (E2E latency CDF per router), and when the training history
is known ``learning_curve.png`` (training-episode mean E2E against env steps, with ``lor`` on
the same episodes as a reference) and ``dispatch_distribution.png`` (each replica's share of
every rollout's requests over training). ``train/evaluate.py`` writes the same report for any
saved policy on any scenario.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text
from llm_cluster_env.env import LLMClusterEnv
from llm_cluster_env.evaluation import (
    RouterResult,
    evaluate_routers,
    format_table,
    plot_latency_cdf,
    run_episode,
    write_csv,
)
from llm_cluster_env.routers import make_router
from sb3_warmstart.router import PolicyRouter

POLICY_NAME = "ppo"
CLONE_NAME = "bc_clone"


def evaluate_policy(policy_routers: Mapping[str, Any], env_kwargs: Mapping[str, Any],
                    heuristics: Sequence[str], seeds: Sequence[int]) -> dict[str, RouterResult]:
    """Learned routers (name -> ``PolicyRouter``) and heuristics on the same held-out seeds."""
    factories = {name: (lambda r=router: r) for name, router in policy_routers.items()}
    factories.update({name: (lambda n=name: make_router(n)) for name in heuristics})
    return evaluate_routers(env_kwargs, factories, seeds)


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


def plot_learning_curve(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                        baselines: Mapping[str, float] | None = None, title: str = "") -> None:
    """Training-episode mean E2E latency against env steps, one line per run.

    :param curves: run name -> episode rows (``num_timesteps``, ``e2e_mean``).
    :param baselines: name -> mean E2E of a heuristic on episodes of the same length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        if not rows:
            continue
        steps, means, moving = episode_curve(rows)
        line, = ax.plot(steps, means, alpha=0.3)
        ax.plot(steps, moving, color=line.get_color(), lw=2, label=f"{name} (moving mean)")
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{7 + i}", label=f"{name} (same episodes)")
    ax.set_xlabel("env steps (routed requests)")
    ax.set_ylabel("mean E2E latency per episode (s)")
    ax.set_title(title or "learning curve")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stackplot(steps, shares.T, labels=[f"replica {i}" for i in range(n)], alpha=0.85)
    ax.plot(steps, [r["balance"] for r in rollout_rows], color="black", lw=1.2,
            label="balance (1 - std)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("env steps (routed requests)")
    ax.set_ylabel("share of the rollout's requests")
    ax.set_title(title or "dispatch distribution over training")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heuristic_on_training_episodes(env_kwargs: Mapping[str, Any], router: str,
                                   seeds: Sequence[int]) -> float:
    """Mean E2E of a heuristic on episodes shaped like the training episodes (baseline line)."""
    env = LLMClusterEnv(**env_kwargs)
    return float(np.mean([run_episode(env, make_router(router), s)[0]["e2e_mean"]
                          for s in seeds]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(folder: str | Path, results: Mapping[str, RouterResult], *, title: str,
                 history: Sequence[Mapping[str, Any]] = (), baselines: Mapping[str, float] | None
                 = None, notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the report files; returns a JSON-able summary (per-router means, comparisons)."""
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
    plot_latency_cdf(results, folder / "latency_cdf.png", title=f"{title}: E2E latency CDF")
    episodes = [r for r in history if r.get("kind") == "episode" and "e2e_mean" in r]
    rollouts = [r for r in history if r.get("kind") == "rollout"]
    if episodes:
        plot_learning_curve({POLICY_NAME: episodes}, folder / "learning_curve.png", baselines,
                            title=f"{title}: learning curve")
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
                 timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The pipeline's final stage: evaluate, print the table, write ``<run>/report``."""
    run_dir = Path(run_dir)
    ev = config.evaluation
    env_kwargs = dict(config.env_kwargs)
    if ev.episode_requests is not None:
        env_kwargs["episode_requests"] = ev.episode_requests
    seeds = list(range(ev.seed, ev.seed + ev.episodes))
    model, venv = session.model, session.venv
    learned = {POLICY_NAME: PolicyRouter(model, venv.obs_rms, name=POLICY_NAME)}
    reference = getattr(model, "reference_policy", None)
    if reference is not None:
        obs_rms = pretrained.obs_rms if pretrained is not None else venv.obs_rms
        learned[CLONE_NAME] = PolicyRouter(reference, obs_rms, name=CLONE_NAME)
    results = evaluate_policy(learned, env_kwargs, ev.router_names, seeds)
    history = monitor.history_rows() if monitor is not None else []
    baselines = {"lor": heuristic_on_training_episodes(config.env_kwargs, "lor",
                                                       [ev.seed + 500 + i for i in range(3)])}
    scenario = config.env_kwargs.get("scenario", "custom")
    notes: dict[str, Any] = {"evaluation": f"{ev.episodes} held-out episodes (seeds {seeds[0]}.."
                             f"{seeds[-1]}) of {env_kwargs.get('episode_requests', 'scenario')} "
                             "requests", "ppo env steps": int(model.num_timesteps)}
    if pretrained is not None:
        notes["warm start"] = {k: pretrained.summary.get(k) for k in
                               ("val_accuracy", "val_tie_accuracy", "fine_tuned")
                               if k in pretrained.summary}
    if timings:
        notes["wall time (s)"] = {k: round(v, 1) for k, v in timings.items()}
    summary = write_report(run_dir / "report", results, title=f"{scenario}", history=history,
                           baselines=baselines, notes=notes)
    print(f"\n== {scenario}: trained policy vs heuristics ({len(seeds)} held-out episodes)")
    print(summary["table"])
    return summary
