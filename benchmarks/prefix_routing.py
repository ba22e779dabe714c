"""Prefix-cache routing: every heuristic router on the prefix scenarios, and what capacity allows.

Prints, from one run:

1. ``--capacity``: the saturation throughput (requests/s per replica) of each prefix scenario's
   workload with prefix caching *off*, which defines the scenarios' loads (so a load does not
   depend on the router), and, for context, with caching on under round robin. Saturation as in
   ``benchmarks/capacity.py``: arrivals far faster than service, throughput over the middle 60%
   of completions.
2. ``--lru``: the issue's motivating table, a pure cache simulation of the Mooncake trace (no
   timing): 8 replicas, each a plain LRU cache of 512-token hash blocks (a partial last block
   counted as a block, as the issue did), the share of prompt
   blocks that are prefix hits when requests go round robin or by consistent hashing of their
   first two blocks (``session_affinity``), at ~400k tokens per replica (an A100-80GB's KV cache
   for an 8B GQA model), ~1.5M and unbounded.
3. the router comparison (default): per scenario and router, mean/p99 TTFT and E2E, the
   prefix hit rate (share of prompt tokens found cached at first admission), the dispatch
   balance, and the change of mean TTFT against ``lor`` and against the best cache-aware
   heuristic; ``--host`` adds the scenarios again with the host-memory tier (128 GB per
   replica at 25 GB/s). Every number also goes to ``--output`` as JSON.

Usage: ``python -m benchmarks.prefix_routing [--episodes 3] [--requests 2000]
[--scenarios mooncake_conv multiturn_chat shared_system_prompt] [--capacity] [--lru] [--host]
[--output runs/prefix_routing.json] [--policy RUN_DIR] [--trace-rows 8400 12031]``.
``--policy`` adds trained routers (run folders) to the comparison; ``--trace-rows`` evaluates
on a part of a replayed trace (the ``prefix`` profile trains on rows 0-8400 of the Mooncake
trace and is evaluated on rows 8400-12031). The Mooncake scenarios read
``../shared/data/mooncake/conversation_trace.jsonl`` beside the repository; they are skipped
with a message when it is absent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks._common import time_episode
from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.tools.evaluation import evaluate_routers
from llm_cluster_env.routing.prefix_index import ApproximatePrefixIndex
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, SessionAffinityRouter, make_router
from llm_cluster_env.scenarios import load_scenario_dict
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.workload import TraceError, load_trace

MOONCAKE = Path(load_scenario_dict("mooncake_conv")["workload"]["trace_path"])
SCENARIOS = ("mooncake_conv", "multiturn_chat", "shared_system_prompt")
COLUMNS = (("ttft_mean", "TTFT mean", 3), ("ttft_p99", "TTFT p99", 2), ("e2e_mean", "E2E mean", 2),
           ("e2e_p99", "E2E p99", 1), ("prefix_hit_rate_tokens", "hit %", None),
           ("balance", "balance", 3))


# --------------------------------------------------------------------------------------------
# 1. capacity
# --------------------------------------------------------------------------------------------


def saturation(scenario: str, caching: bool, requests: int) -> float:
    """Requests/s one replica completes with the scenario's workload arriving far too fast."""
    workload = dict(load_scenario_dict(scenario)["workload"])
    if workload.get("arrival") == "trace":
        workload["trace_qps"] = 1000.0
        workload["trace_start"] = 0
    else:
        workload["qps"] = 1000.0
    env = LLMClusterEnv(scenario=scenario, num_replicas=1, episode_requests=requests,
                        replica={"prefix_caching": caching}, workload=workload)
    time_episode(env, "round_robin")
    finish = np.sort([r.finish_time for r in env.cluster.requests])
    lo, hi = int(0.2 * len(finish)), int(0.8 * len(finish))
    return (hi - lo) / (finish[hi] - finish[lo])


def capacity_table(scenarios: list[str], requests: int) -> dict:
    print("1) saturation throughput per replica (req/s), round robin, "
          f"{requests} requests at 1,000 req/s")
    print(f"{'scenario':>22}  {'caching off':>11}  {'caching on':>10}")
    out = {}
    for name in scenarios:
        off = saturation(name, False, requests)
        on = saturation(name, True, requests)
        out[name] = {"caching_off_rps": off, "caching_on_rps": on}
        print(f"{name:>22}  {off:>11.3f}  {on:>10.3f}")
    return out


# --------------------------------------------------------------------------------------------
# 2. the LRU table
# --------------------------------------------------------------------------------------------


def lru_table(path: Path, replicas: int = 8) -> dict:
    """Prefix-hit share of the trace's prompt blocks with plain LRU caches of hash blocks."""
    trace = load_trace(path)
    block = trace.hash_block_tokens
    chains = [PrefixChain(segs + (-(j + 1),), tuple(range(0, (len(segs) + 1) * block, block)))
              for j, segs in enumerate(trace.segments)]
    total = sum(len(s) for s in trace.segments)
    ring = SessionAffinityRouter()
    ring.reset(replicas)
    keys = trace.session_keys.tolist()
    print(f"\n2) {path.name}: share of prompt blocks that are prefix hits, {replicas} replicas, "
          f"plain LRU caches of {block}-token blocks")
    print(f"{'tokens per replica':>18}  {'round robin':>11}  {'first two blocks hashed':>23}")
    out = {}
    for tokens in (400_000, 1_500_000, None):
        row = {}
        for policy in ("round_robin", "session_affinity"):
            caches = [ApproximatePrefixIndex(tokens // block if tokens else 1 << 40)
                      for _ in range(replicas)]
            hits = 0
            for j, (chain, segs) in enumerate(zip(chains, trace.segments)):
                cache = caches[j % replicas if policy == "round_robin" else ring.replica_of(keys[j])]
                starts = chain.block_starts(block)
                hits += cache.match(chain.ids, starts, len(segs))
                cache.insert(chain.ids, starts, len(segs))
            row[policy] = hits / total
        label = f"{tokens:,}" if tokens else "unbounded"
        out[label] = row
        print(f"{label:>18}  {100 * row['round_robin']:>10.1f}%  "
              f"{100 * row['session_affinity']:>22.1f}%")
    return out


# --------------------------------------------------------------------------------------------
# 3. routers
# --------------------------------------------------------------------------------------------


def compare(scenario: str, episodes: int, requests: int, seed: int, host: bool,
            policies: dict | None = None, trace_rows: tuple[int, int] | None = None,
            names: list[str] | None = None) -> dict:
    """Every heuristic (and each trained policy of ``policies``: name -> factory) on the
    scenario; with ``trace_rows`` the episodes are windows inside those rows of its trace."""
    kwargs: dict = {"scenario": scenario, "episode_requests": requests}
    if host:
        kwargs["replica"] = {"host_cache": True}
    if trace_rows is not None:
        workload = dict(load_scenario_dict(scenario)["workload"])
        if workload.get("arrival") != "trace":
            raise SystemExit(f"--trace-rows: scenario {scenario!r} does not replay a trace")
        kwargs["workload"] = {**workload, "trace_rows": list(trace_rows)}
    seeds = list(range(seed, seed + episodes))
    start = time.perf_counter()
    routers = {n: (lambda n=n: make_router(n)) for n in (names or ROUTERS)}
    routers.update(policies or {})
    results = evaluate_routers(kwargs, routers, seeds)
    elapsed = time.perf_counter() - start
    summary = {name: res.summary() for name, res in results.items()}
    best = min((n for n in CACHE_AWARE_ROUTERS if n in summary),
               key=lambda n: summary[n]["ttft_mean"])
    title = scenario + (" + host tier (128 GB, 25 GB/s)" if host else "")
    print(f"\n== {title}: {episodes} episode(s) of {requests} requests, seeds "
          f"{seeds[0]}..{seeds[-1]}, {elapsed:.0f} s")
    header = f"{'router':>18}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS)
    print(header + f"{'TTFT vs lor':>12}{'vs best':>9}")
    lor = summary["lor"]["ttft_mean"] if "lor" in summary else float("nan")
    for name, row in summary.items():
        cells = []
        for key, _, digits in COLUMNS:
            value = row.get(key, float("nan"))
            cells.append(f"{100 * value:>9.1f}%" if digits is None else f"{value:>10.{digits}f}")
        print(f"{name:>18}" + "".join(cells)
              + f"{100 * (row['ttft_mean'] / lor - 1):>+11.1f}%"
              + f"{100 * (row['ttft_mean'] / summary[best]['ttft_mean'] - 1):>+8.1f}%")
    print(f"   best cache-aware heuristic by mean TTFT: {best}")
    for name in policies or {}:
        row, ref = summary[name], summary[best]
        print(f"   {name}: mean TTFT {100 * (row['ttft_mean'] / ref['ttft_mean'] - 1):+.1f}%, "
              f"p99 E2E {100 * (row['e2e_p99'] / ref['e2e_p99'] - 1):+.1f}% vs {best}")
    return {"routers": summary, "best_cache_aware": best, "seeds": seeds,
            "trace_rows": list(trace_rows) if trace_rows else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--capacity", action="store_true", help="measure the capacities")
    parser.add_argument("--capacity-requests", type=int, default=6000)
    parser.add_argument("--lru", action="store_true", help="the Mooncake LRU hit-share table")
    parser.add_argument("--host", action="store_true", help="also with the host-memory tier")
    parser.add_argument("--no-compare", action="store_true", help="skip the router comparison")
    parser.add_argument("--output", default=None, help="write every number as JSON here")
    parser.add_argument("--policy", action="append", default=[],
                        help="run folder or model zip of a trained router (repeatable)")
    parser.add_argument("--routers", default=None,
                        help="comma-separated heuristics to compare (default: all; keep lor and "
                             "at least one cache-aware router)")
    parser.add_argument("--trace-rows", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="episodes inside these rows of a replayed trace (held-out part)")
    args = parser.parse_args()
    names = None
    if args.routers:
        names = args.routers.split(",")
        unknown = [n for n in names if n not in ROUTERS]
        if unknown or "lor" not in names or not set(names) & set(CACHE_AWARE_ROUTERS):
            parser.error(f"--routers {args.routers!r}: unknown {unknown}, or lor or a "
                         "cache-aware router missing")
    policies = {}
    if args.policy:
        from benchmarks.generalisation import load_policy_routers

        policies = load_policy_routers(args.policy)
    report: dict = {}
    if args.capacity:
        report["capacity"] = capacity_table(args.scenarios, args.capacity_requests)
    if args.lru:
        if MOONCAKE.is_file():
            report["lru"] = lru_table(MOONCAKE)
        else:
            print(f"\n2) skipped: {MOONCAKE} not found")
    if not args.no_compare:
        report["compare"] = {}
        for scenario in args.scenarios:
            for host in (False, True) if args.host else (False,):
                key = scenario + ("+host" if host else "")
                try:
                    report["compare"][key] = compare(scenario, args.episodes, args.requests,
                                                     args.seed, host, policies, args.trace_rows,
                                                     names)
                except TraceError as err:
                    print(f"\n== {scenario}: skipped ({err})")
    if args.output:
        atomic_write_json(args.output, report)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
