"""Run routers on a scenario and compare them: the shared core of ``compare`` and ``evaluate``.

A router is anything with ``reset(num_replicas, rng)`` and ``select(view) -> int`` (heuristics
from :mod:`llm_cluster_env.routing.heuristics`, learned policies wrapped by ``sb3_warmstart``). Every router
runs on the same seeds, hence the same workloads.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_text
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.base import Router
from llm_cluster_env.sim.metrics import RequestLatencies
from llm_cluster_env.sim.metrics import balance_score as balance_score  # for the training side

TABLE_COLUMNS = (
    ("e2e_mean", "E2E mean s", "{:.3f}"),
    ("e2e_p50", "E2E p50 s", "{:.3f}"),
    ("e2e_p99", "E2E p99 s", "{:.3f}"),
    ("ttft_mean", "TTFT mean s", "{:.3f}"),
    ("ttft_p99", "TTFT p99 s", "{:.3f}"),
    ("tpot_mean", "TPOT mean ms", "{:.1f}"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("slo_attainment", "SLO %", "{:.1f}"),
    ("goodput_rps", "goodput/s", "{:.2f}"),
    ("balance", "balance", "{:.3f}"),
    ("preemptions_total", "preempt", "{:.0f}"),
)
#: Added to the table when the replicas cache prefixes.
PREFIX_TABLE_COLUMNS = (("prefix_hit_rate_tokens", "hit %", "{:.1f}"),)
_SCALE = {"tpot_mean": 1000.0, "slo_attainment": 100.0, "prefix_hit_rate_tokens": 100.0}


@dataclass
class RouterResult:
    """A router's per-episode metrics and its requests' latencies, episode by episode.

    :param episodes: ``run_episode``'s metrics per episode.
    :param e2e: per episode, every finished request's end-to-end latency (seconds).
    :param ttft: per episode, every finished request's time to first token (seconds).
    """

    name: str
    episodes: list[dict[str, float]] = field(default_factory=list)
    e2e: list[np.ndarray] = field(default_factory=list)
    ttft: list[np.ndarray] = field(default_factory=list)

    def add(self, metrics: Mapping[str, float], latencies: RequestLatencies) -> None:
        """Record one episode (``run_episode``'s metrics and latencies)."""
        self.episodes.append(dict(metrics))
        self.e2e.append(latencies.e2e)
        self.ttft.append(latencies.ttft)

    def mean(self, key: str) -> float:
        values = [ep[key] for ep in self.episodes if key in ep and not math.isnan(ep[key])]
        return float(np.mean(values)) if values else float("nan")

    @property
    def pooled_e2e(self) -> np.ndarray:
        return np.concatenate(self.e2e) if self.e2e else np.zeros(0)

    @property
    def pooled_ttft(self) -> np.ndarray:
        return np.concatenate(self.ttft) if self.ttft else np.zeros(0)

    def summary(self) -> dict[str, float]:
        keys = sorted({k for ep in self.episodes for k in ep})
        return {k: self.mean(k) for k in keys}


def run_episode(env: LLMClusterEnv, router: Router, seed: int,
                options: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, float], RequestLatencies]:
    """Route one episode of ``env`` (unwrapped) with ``router``; return metrics and latencies.

    The router draws from ``default_rng(seed + 7919)``; ``options`` go to ``env.reset`` (e.g.
    ``{"workload": w}`` to serve a given workload). The env computes only the features the
    router reads (``Router.reads``; everything for a router that does not say), and the whole
    observation again afterwards.
    """
    observe_for = getattr(env, "observe_for", None)  # envs without it compute everything
    if observe_for is not None:
        observe_for(router)
    try:
        env.reset(seed=seed, options=dict(options) if options else None)
        bind = getattr(router, "bind", None)  # planners simulate the env's workload and cluster
        if bind is not None:
            bind(env)
        router.reset(env.num_replicas, np.random.default_rng(seed + 7_919))
        terminated = False
        info: dict[str, Any] = {}
        while not terminated:
            _, _, terminated, _, info = env.step(router.select(env.view))
    finally:
        if observe_for is not None:
            observe_for(None)
    return info["metrics"], RequestLatencies.from_requests(env.cluster.requests)


def evaluate_routers(
    env_kwargs: Mapping[str, Any],
    routers: Mapping[str, Callable[[], Router]],
    seeds: Sequence[int],
    progress: Callable[[str], None] | None = None,
) -> dict[str, RouterResult]:
    """Run every router on every seed of the scenario given by ``env_kwargs``.

    :param env_kwargs: keyword arguments of ``LLMCluster-v0`` (including ``scenario``).
    :param routers: name -> factory of a fresh router (all are built, and refused if they read
        a feature this env does not provide, before any episode runs).
    :param seeds: episode seeds, shared by all routers.
    :param progress: called with a short message after each episode.
    """
    env = LLMClusterEnv(**env_kwargs)
    built = {name: factory() for name, factory in routers.items()}
    for router in built.values():  # a router reading a feature the env lacks: refused now
        env.observe_for(router)
    env.observe_for(None)
    results: dict[str, RouterResult] = {}
    for name, router in built.items():
        result = RouterResult(name)
        for seed in seeds:
            metrics, latencies = run_episode(env, router, seed)
            result.add(metrics, latencies)
            if progress:
                progress(f"{name} seed {seed}: mean E2E {metrics['e2e_mean']:.3f} s")
        results[name] = result
    return results


def format_table(results: Mapping[str, RouterResult], baseline: str | None = "lor") -> str:
    """A plain-text table, one row per router, metrics averaged over episodes (with the prefix
    hit rate when the episodes report one)."""
    columns = TABLE_COLUMNS
    if any("prefix_hit_rate_tokens" in ep for res in results.values() for ep in res.episodes):
        columns += PREFIX_TABLE_COLUMNS
    headers = ["router"] + [h for _, h, _ in columns]
    if baseline in results:
        headers.append(f"vs {baseline}")
    rows = []
    base = results[baseline].mean("e2e_mean") if baseline in results else None
    for name, res in results.items():
        row = [name]
        for key, _, fmt in columns:
            row.append(fmt.format(res.mean(key) * _SCALE.get(key, 1.0)))
        if base is not None:
            row.append(f"{100.0 * (res.mean('e2e_mean') / base - 1.0):+.1f}%")
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_csv(results: Mapping[str, RouterResult], path: str | Path) -> None:
    """Per-router mean of every metric, one row per router (the file is replaced atomically)."""
    summaries = {name: res.summary() for name, res in results.items()}
    keys = sorted({k for s in summaries.values() for k in s})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["router"] + keys)
    for name, s in summaries.items():
        writer.writerow([name] + [s.get(k, "") for k in keys])
    atomic_write_text(path, text.getvalue())


def plot_latency_cdf(results: Mapping[str, RouterResult], path: str | Path, title: str = ""):
    """One E2E-latency CDF per router in a PNG (needs matplotlib); returns the (closed) figure.

    Every router gets its own colour and line style (``tab10`` colours with solid lines for the
    first ten, then dashed, dotted, dash-dotted), so 12+ routers never share one; the legend
    sits beside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = matplotlib.colormaps["tab10"].colors
    line_styles = ("-", "--", ":", "-.")
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for i, (name, res) in enumerate(results.items()):
        e2e = np.sort(res.pooled_e2e)
        if e2e.size:
            ax.plot(e2e, np.arange(1, e2e.size + 1) / e2e.size, label=name,
                    color=colors[i % len(colors)],
                    linestyle=line_styles[(i // len(colors)) % len(line_styles)],
                    linewidth=2.0 if i < len(colors) else 1.6)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title or "E2E latency CDF", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
