"""The generalist router against every heuristic and the look-ahead, on scenarios training never
sampled.

Grid (each cell a fixed cluster and workload; loads are fractions of measured saturation
throughput for the cell's lengths, :mod:`llm_cluster_env.env.capacity`):

============================  ======================================  ==========================
cell                          cluster                                 workload
============================  ======================================  ==========================
``arxiv_4xA100_70``           4x A100                                 arXiv lengths, Poisson, 70%
``arxiv_4xA100_90``           4x A100                                 arXiv lengths, Poisson, 90%
``longprompt_bursty_4xA100``  4x A100                                 prompts ~2,000 / outputs
                                                                      ~30 tokens, gamma CV 3, 70%
``longprompt_2xA100_2xH100``  2x A100 + 2x H100                       the same lengths, Poisson,
                                                                      70%
``conv_8xA100``               8x A100                                 conversation, Poisson, 75%
``conv_32xA100``              32x A100 (twice the largest trained)    conversation, Poisson, 75%
``conv_2xA40_2xH100``         2x A40 + 2x H100                        conversation, Poisson, 70%
============================  ======================================  ==========================

For every cell and seed, every router serves the same requests. Printed per cell: mean/p99 E2E
and TTFT, balance, the change against ``lor`` and against the best heuristic (the look-ahead is
a baseline, not a heuristic), and for learned policies the share of decisions with any input at
the clip bound of the policy's input scaling. A summary line per policy gives its worst gap to
the best heuristic, its mean gap to the look-ahead and its mean gain over ``lor`` on the
heterogeneous cells.

Usage::

    python -m benchmarks.generalisation [--policy runs/default] [--episodes 5]
        [--requests 1500] [--cells all] [--no-lookahead] [--out results.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.config import EnvConfig, ReplicaConfig, WorkloadConfig
from llm_cluster_env.env.capacity import saturation_throughput
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, make_router
from llm_cluster_env.tools.evaluation import RouterResult, run_episode

LONG_PROMPT = {"lengths": "lognormal", "prompt_lognormal": (2000.0, 0.6),
               "output_lognormal": (30.0, 0.6)}
ARXIV = {"lengths": "empirical", "empirical": "arxiv_summarization"}
CONV = {"lengths": "empirical", "empirical": "splitwise_conv"}

#: cell -> (GPU of each replica, length settings, arrival settings, load)
CELLS: dict[str, tuple[list[str], dict, dict, float]] = {
    "arxiv_4xA100_70": (["a100"] * 4, ARXIV, {"arrival": "poisson"}, 0.70),
    "arxiv_4xA100_90": (["a100"] * 4, ARXIV, {"arrival": "poisson"}, 0.90),
    "longprompt_bursty_4xA100": (["a100"] * 4, LONG_PROMPT, {"arrival": "gamma", "cv": 3.0},
                                 0.70),
    "longprompt_2xA100_2xH100": (["a100"] * 2 + ["h100"] * 2, LONG_PROMPT,
                                 {"arrival": "poisson"}, 0.70),
    "conv_8xA100": (["a100"] * 8, CONV, {"arrival": "poisson"}, 0.75),
    "conv_32xA100": (["a100"] * 32, CONV, {"arrival": "poisson"}, 0.75),
    "conv_2xA40_2xH100": (["a40"] * 2 + ["h100"] * 2, CONV, {"arrival": "poisson"}, 0.70),
}
HETEROGENEOUS = ("longprompt_2xA100_2xH100", "conv_2xA40_2xH100")
#: Every heuristic that reads only the observation; the prefix-cache-aware ones are left out
#: (no cell caches prefixes, so they would only repeat their load rules).
HEURISTICS = tuple(n for n, cls in ROUTERS.items()
                   if not cls.requires_context and n not in CACHE_AWARE_ROUTERS)


def cell_config(name: str, requests: int, observation: Mapping[str, Any] | None = None,
                cache: dict | None = None) -> EnvConfig:
    """The :class:`EnvConfig` of a grid cell, its rate set from measured capacity."""
    gpus, lengths, arrivals, load = CELLS[name]
    replicas = tuple(ReplicaConfig(gpu=g) for g in gpus)
    length_config = WorkloadConfig(**lengths)
    capacity = sum(saturation_throughput(r, length_config, 3000, shared_cache=cache)
                   for r in replicas)
    workload = WorkloadConfig(**lengths, **arrivals, qps=load * capacity)
    config = EnvConfig(name=name, replicas=replicas, workload=workload,
                       episode_requests=requests)
    if observation:
        config = replace(config, observation=replace(config.observation, **observation))
    return config


def evaluate_cell(name: str, routers: Mapping[str, Callable[[], Any]], seeds: list[int],
                  requests: int, cache: dict, observation: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, RouterResult]:
    env = LLMClusterEnv(config=cell_config(name, requests, observation, cache),
                        shared_cache=cache)
    results: dict[str, RouterResult] = {}
    for router_name, factory in routers.items():
        result = RouterResult(router_name)
        router = factory()
        start = time.perf_counter()
        for seed in seeds:
            metrics, latencies = run_episode(env, router, seed)
            clip = getattr(router, "clip_report", None)
            if clip is not None:
                metrics.update(clip())
            result.episodes.append(metrics)
            result.e2e.append(latencies.e2e)
        results[router_name] = result
        if progress:
            progress(f"{name}: {router_name} mean E2E {result.mean('e2e_mean'):.3f} s "
                     f"({time.perf_counter() - start:.1f} s)")
    return results


def cell_table(name: str, results: Mapping[str, RouterResult]) -> tuple[str, dict[str, Any]]:
    """A printed table for one cell and its summary numbers."""
    lor = results["lor"].mean("e2e_mean")
    heuristics = {n: r for n, r in results.items() if n in HEURISTICS}
    best_name = min(heuristics, key=lambda n: heuristics[n].mean("e2e_mean"))
    best = heuristics[best_name].mean("e2e_mean")
    lines = [f"== {name} (best heuristic: {best_name})",
             f"{'router':>18} {'E2E mean':>9} {'E2E p99':>9} {'TTFT mean':>10} {'TTFT p99':>9}"
             f" {'balance':>8} {'vs lor':>8} {'vs best':>8} {'clip':>6}"]
    summary: dict[str, Any] = {"best_heuristic": best_name, "routers": {}}
    for router_name, res in results.items():
        e2e = res.mean("e2e_mean")
        clip = res.mean("decisions_at_clip")
        row = {"e2e_mean": e2e, "e2e_p99": res.mean("e2e_p99"), "ttft_mean": res.mean("ttft_mean"),
               "ttft_p99": res.mean("ttft_p99"), "balance": res.mean("balance"),
               "vs_lor": e2e / lor - 1.0, "vs_best": e2e / best - 1.0, "clip_share": clip}
        summary["routers"][router_name] = row
        lines.append(f"{router_name:>18} {e2e:>9.3f} {row['e2e_p99']:>9.2f} "
                     f"{row['ttft_mean']:>10.3f} {row['ttft_p99']:>9.2f} {row['balance']:>8.3f} "
                     f"{100 * row['vs_lor']:>+7.1f}% {100 * row['vs_best']:>+7.1f}% "
                     f"{'' if np.isnan(clip) else f'{100 * clip:.1f}%':>6}")
    return "\n".join(lines), summary


def policy_summary(summaries: Mapping[str, dict[str, Any]], policy: str) -> str:
    rows = [s["routers"][policy] for s in summaries.values() if policy in s["routers"]]
    if not rows:
        return ""
    worst = max(summaries, key=lambda c: summaries[c]["routers"][policy]["vs_best"])
    text = (f"{policy}: worst vs best heuristic {100 * summaries[worst]['routers'][policy]['vs_best']:+.1f}% "
            f"({worst})")
    gaps = [s["routers"][policy]["e2e_mean"] / s["routers"]["lookahead"]["e2e_mean"] - 1.0
            for s in summaries.values() if "lookahead" in s["routers"]]
    if gaps:
        text += f"; mean vs lookahead {100 * float(np.mean(gaps)):+.1f}%"
    hetero = [summaries[c]["routers"][policy]["vs_lor"] for c in HETEROGENEOUS if c in summaries]
    if hetero:
        text += f"; heterogeneous cells vs lor {', '.join(f'{100 * h:+.1f}%' for h in hetero)}"
    return text


def load_policy_routers(run_dirs: list[str]) -> dict[str, Callable[[], Any]]:
    """Router factories of trained policies (run folders or model zips). Sets torch to one
    thread: a batch-1 forward gains nothing from a second, and on a shared 2-core machine two
    threads waiting on each other made each decision ~20x slower."""
    import torch

    from sb3_warmstart.policies.router import load_policy_router

    torch.set_num_threads(1)

    factories: dict[str, Callable[[], Any]] = {}
    for path in run_dirs:
        name = f"policy:{Path(path).name}"
        factories[name] = (lambda p=path, n=name: load_policy_router(p, name=n))
    return factories


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", default=[],
                        help="run folder or model zip of a trained policy (repeatable)")
    parser.add_argument("--episodes", type=int, default=5, help="seeds per cell")
    parser.add_argument("--requests", type=int, default=1500, help="requests per episode")
    parser.add_argument("--cells", default="all", help=f"comma-separated ({', '.join(CELLS)})")
    parser.add_argument("--no-lookahead", action="store_true", help="skip the look-ahead")
    parser.add_argument("--seed", type=int, default=50_000, help="first seed")
    parser.add_argument("--out", help="write every number as JSON here")
    args = parser.parse_args(argv)
    cells = list(CELLS) if args.cells == "all" else args.cells.split(",")
    for cell in cells:
        if cell not in CELLS:
            parser.error(f"--cells: unknown cell {cell!r} (known: {', '.join(CELLS)})")
    routers: dict[str, Callable[[], Any]] = {n: (lambda n=n: make_router(n)) for n in HEURISTICS}
    if not args.no_lookahead:
        routers["lookahead"] = lambda: make_router("lookahead")
    if args.policy:
        routers.update(load_policy_routers(args.policy))
    seeds = list(range(args.seed, args.seed + args.episodes))
    cache: dict = {}
    summaries: dict[str, dict[str, Any]] = {}
    for cell in cells:
        results = evaluate_cell(cell, routers, seeds, args.requests, cache,
                                progress=lambda m: print("  " + m, flush=True))
        table, summaries[cell] = cell_table(cell, results)
        print(table, flush=True)
    for name in routers:
        if name.startswith("policy:"):
            print(policy_summary(summaries, name))
    if args.out:
        atomic_write_json(args.out, summaries)
    return summaries


if __name__ == "__main__":
    main()
