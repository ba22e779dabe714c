"""Compare every heuristic router on a scenario: ``python -m llm_cluster_env.tools.compare``.

Prints a table (mean/p50/p99 E2E, TTFT, TPOT, throughput, SLO attainment, balance, the change
in mean E2E against ``lor``) and writes ``results.csv``, ``results.json`` and a latency-CDF PNG
into ``--output-dir/<scenario>/``. With ``--scenario all`` it runs every packaged scenario
(skipping, with a message, those whose trace file is not there). ``--routers all`` includes the
prefix-cache-aware routers on scenarios whose replicas cache prefixes (where they also report
prefix hit rates); name them to run them elsewhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.config import ConfigError, EnvConfig
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS
from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
from llm_cluster_env.scenarios import available_scenarios, scenario_description
from llm_cluster_env.tools.evaluation import (
    evaluate_routers,
    format_table,
    plot_latency_cdf,
    write_csv,
)
from llm_cluster_env.workload import TraceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_cluster_env.tools.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="a100x4_conv_70",
                        help="packaged scenario name, a YAML path, or 'all' "
                             f"(packaged: {', '.join(available_scenarios())})")
    parser.add_argument("--routers", default="all",
                        help=f"comma-separated router names ({', '.join(ALL_ROUTERS)}) or 'all' "
                             "(every heuristic and the look-ahead; planners only when named)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes (seeds) per router")
    parser.add_argument("--seed", type=int, default=1000, help="first episode seed")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per episode (default: the scenario's)")
    parser.add_argument("--output-dir", default="runs/compare", help="where results go")
    parser.add_argument("--no-plot", action="store_true", help="skip the latency-CDF PNG")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes={args.episodes}: must be >= 1")
    if args.seed < 0:
        parser.error(f"--seed={args.seed}: must be >= 0")
    if args.scenario != "all":
        try:
            EnvConfig.from_kwargs(scenario=args.scenario)
        except (ConfigError, OSError) as err:
            parser.error(f"--scenario: {err}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir={args.output_dir!r}: exists and is not a directory")
    if args.requests is not None and args.requests < 1:
        parser.error(f"--requests={args.requests}: must be >= 1")
    names = list(ROUTERS) if args.routers == "all" else args.routers.split(",")
    for name in names:
        if name not in ALL_ROUTERS:
            parser.error(f"--routers: unknown router {name!r} (known: {', '.join(ALL_ROUTERS)})")
    args.router_names = names
    args.all_routers = args.routers == "all"
    return args


def _routers_for(config: EnvConfig, args: argparse.Namespace) -> list[str]:
    """The routers to run on a scenario: with ``--routers all``, the cache-aware ones only
    where the replicas cache prefixes."""
    if args.all_routers and not any(r.prefix_caching for r in config.replica_configs):
        return [n for n in args.router_names if n not in CACHE_AWARE_ROUTERS]
    return args.router_names


def compare_scenario(scenario: str, args: argparse.Namespace) -> dict:
    env_kwargs: dict = {"scenario": scenario}
    if args.requests:
        env_kwargs["episode_requests"] = args.requests
    seeds = list(range(args.seed, args.seed + args.episodes))
    names = _routers_for(EnvConfig.from_kwargs(**env_kwargs), args)
    start = time.perf_counter()
    results = evaluate_routers(env_kwargs, {n: (lambda n=n: make_any_router(n)) for n in names},
                               seeds)
    elapsed = time.perf_counter() - start
    name = Path(scenario).stem
    print(f"\n== {name}: {scenario_description(scenario)}")
    print(f"   {args.episodes} episode(s) per router, seeds {seeds[0]}..{seeds[-1]}, "
          f"{elapsed:.1f} s wall")
    print(format_table(results))
    out = Path(args.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "results.csv")
    summary = {n: r.summary() for n, r in results.items()}
    atomic_write_json(out / "results.json", summary)
    if not args.no_plot:
        plot_latency_cdf(results, out / "latency_cdf.png", title=f"{name}: E2E latency")
    print(f"   wrote {out}/results.csv, results.json" + ("" if args.no_plot else ", latency_cdf.png"))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = available_scenarios() if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        try:
            compare_scenario(scenario, args)
        except TraceError as err:  # a scenario replaying a file that is not there
            if args.scenario != "all":
                print(f"compare: error: {err}", file=sys.stderr)
                return 2
            print(f"\n== {Path(scenario).stem}: skipped ({err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
