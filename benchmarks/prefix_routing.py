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
4. ``--headline``: the issue-21 table on the Mooncake trace's held-out rows (``--trace-rows``,
   default 8,400-12,031) at 70/80/90% load (``mooncake_conv_70``, ``mooncake_conv``,
   ``mooncake_conv_90``), ``--windows`` paired windows of ``--window-requests`` requests (the
   same seeds, hence the same trace windows, for every router and load): per router mean TTFT,
   p99 E2E, SLO goodput and prefix hit rate for the four cache-aware heuristics, the load
   rules and ``lookahead``; the per-request TTFT lower bound
   (:mod:`llm_cluster_env.tools.ttft_bounds`) and round robin as the two ends ("position" =
   ``(router - bound) / (round_robin - bound)`` of mean TTFT: 0 = at the bound, 1 = round
   robin); 95% bootstrap intervals of the paired per-window relative differences against the
   best cache-aware heuristic (by mean TTFT); the headroom ``1 - bound / best``; and how many
   requests finished below their bound (a check; 0 expected). Windows that do not fit in the
   trace are refused before anything runs.

Usage: ``python -m benchmarks.prefix_routing [--episodes 3] [--requests 2000]
[--scenarios mooncake_conv multiturn_chat shared_system_prompt] [--capacity] [--lru] [--host]
[--output runs/prefix_routing.json] [--policy RUN_DIR] [--trace-rows 8400 12031]``.
``python -m benchmarks.prefix_routing --headline --no-compare [--windows 5]
[--window-requests 500] [--slo-ttft S] [--slo-tpot S]`` runs the headline table alone.
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
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.routing.heuristics import (
    CACHE_AWARE_ROUTERS,
    ROUTERS,
    SessionAffinityRouter,
    make_router,
)
from llm_cluster_env.routing.prefix_index import ApproximatePrefixIndex
from llm_cluster_env.scenarios import load_scenario_dict
from llm_cluster_env.tools.evaluation import evaluate_routers, run_episode
from llm_cluster_env.tools.paired_stats import compare_paired
from llm_cluster_env.tools.ttft_bounds import ttft_bounds
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


# --------------------------------------------------------------------------------------------
# 4. the headline table: routers between the TTFT bound and round robin
# --------------------------------------------------------------------------------------------

#: (scenario, load against capacity with caching off) of the headline table.
HEADLINE_SCENARIOS = (("mooncake_conv_70", 0.7), ("mooncake_conv", 0.8), ("mooncake_conv_90", 0.9))
#: Rows of the trace the ``prefix`` profile never trains on.
HELD_OUT_ROWS = (8400, 12031)
HEADLINE_ROUTERS = (*CACHE_AWARE_ROUTERS, "least_added_time", "least_tokens", "lor",
                    "round_robin", "lookahead")
#: Per-episode metrics of the headline table: key, label, lower is better.
HEADLINE_METRICS = (("ttft_mean", "TTFT mean s", True), ("e2e_p99", "E2E p99 s", True),
                    ("goodput_rps", "goodput/s", False), ("prefix_hit_rate_tokens", "hit %", False))
#: Seed of the bootstrap resampling generator (intervals are reproducible).
BOOTSTRAP_SEED = 0


def check_trace_window(path: Path, rows: tuple[int, int], requests: int) -> None:
    """Refuse (``ValueError`` naming ``--trace-rows`` or ``--window-requests`` and the value)
    rows outside the trace at ``path`` or too few rows for one window of ``requests``."""
    first, end = rows
    total = len(load_trace(path))
    if not 0 <= first < end <= total:
        raise ValueError(f"--trace-rows={first} {end}: must satisfy 0 <= START < END <= "
                         f"{total} (the rows of {path})")
    if requests < 1 or requests > end - first:
        raise ValueError(f"--window-requests={requests}: must be in [1, {end - first}] (the "
                         f"rows {first}-{end} of {path})")


def headline_load(scenario: str, windows: int, requests: int, seed: int,
                  trace_rows: tuple[int, int], slo: dict,
                  routers: tuple[str, ...] = HEADLINE_ROUTERS) -> dict:
    """Every router of ``routers`` on ``windows`` paired windows of ``scenario`` inside
    ``trace_rows``, and the TTFT bound of each window. Per router and window: the
    :data:`HEADLINE_METRICS` and the requests whose TTFT is below their bound."""
    workload = dict(load_scenario_dict(scenario)["workload"])
    kwargs = {"scenario": scenario, "episode_requests": requests,
              "workload": {**workload, "trace_rows": list(trace_rows)}}
    if slo:
        kwargs["slo"] = slo
    env = LLMClusterEnv(**kwargs)
    seeds = list(range(seed, seed + windows))
    per_router: dict[str, dict[str, list[float]]] = {}
    bound: dict[str, list[float]] = {"cached": [], "uncached": [], "attainable": [],
                                     "cacheable_fraction": []}
    bounds_of_seed = {}
    ttft_slo = env.config.slo.ttft_s
    start = time.perf_counter()
    for name in routers:
        rows: dict[str, list[float]] = {key: [] for key, _, _ in HEADLINE_METRICS}
        rows["below_bound"] = []
        rows["wall_s"] = []
        for s in seeds:
            t0 = time.perf_counter()
            metrics, latencies = run_episode(env, make_router(name), s)
            rows["wall_s"].append(time.perf_counter() - t0)
            if s not in bounds_of_seed:  # the workload depends on the seed only
                served = env.cluster.requests
                b = ttft_bounds(served, env.config.replica_configs)
                bounds_of_seed[s] = b
                prompt = np.array([r.prompt_tokens for r in served], dtype=np.float64)
                bound["cached"].append(float(b.cached.mean()))
                bound["uncached"].append(float(b.uncached.mean()))
                bound["attainable"].append(float(np.mean(b.cached <= ttft_slo)))
                bound["cacheable_fraction"].append(float(b.cacheable_tokens.sum() / prompt.sum()))
            b = bounds_of_seed[s]
            lower = b.cached[np.searchsorted(b.request_id, latencies.request_id)]
            rows["below_bound"].append(float(np.count_nonzero(latencies.ttft < lower - 1e-9)))
            for key, _, _ in HEADLINE_METRICS:
                rows[key].append(float(metrics[key]))
        per_router[name] = rows
        print(f"   {scenario}: {name} done ({sum(rows['wall_s']):.0f} s)", flush=True)
    return {"scenario": scenario, "seeds": seeds, "routers": per_router, "bound": bound,
            "slo": {"ttft_s": ttft_slo, "tpot_s": env.config.slo.tpot_s},
            "wall_s": time.perf_counter() - start}


def summarise_load(result: dict) -> dict:
    """Means over windows, positions between the bound and round robin, the best cache-aware
    heuristic, paired intervals against it and the headroom the bound leaves."""
    routers, bound = result["routers"], result["bound"]
    means = {name: {key: float(np.mean(v)) for key, v in rows.items()}
             for name, rows in routers.items()}
    best = min((n for n in CACHE_AWARE_ROUTERS if n in means), key=lambda n: means[n]["ttft_mean"])
    floor = float(np.mean(bound["cached"]))
    rr = means["round_robin"]["ttft_mean"] if "round_robin" in means else float("nan")
    out: dict = {"best_cache_aware": best, "bound_ttft_mean": floor,
                 "bound_uncached_ttft_mean": float(np.mean(bound["uncached"])),
                 "bound_attainable_ttft_share": float(np.mean(bound["attainable"])),
                 "cacheable_fraction": float(np.mean(bound["cacheable_fraction"])),
                 "headroom_vs_best": 1.0 - floor / means[best]["ttft_mean"],
                 "headroom_vs_best_ci": _paired(bound["cached"], routers[best]["ttft_mean"], True),
                 "routers": {}}
    for name, row in means.items():
        entry = dict(row)
        entry["position"] = (row["ttft_mean"] - floor) / (rr - floor)
        if name != best:
            entry["vs_best"] = {key: _paired(routers[name][key], routers[best][key], lower)
                                for key, _, lower in HEADLINE_METRICS[:3]}
        out["routers"][name] = entry
    return out


def _paired(candidate, baseline, lower_is_better: bool) -> dict:
    """Mean relative difference with its 95% bootstrap interval (fixed-seed resampling)."""
    if len(candidate) < 2:
        diff = (np.asarray(candidate) - np.asarray(baseline)) / np.asarray(baseline)
        return {"mean": float(diff.mean()), "low": float("nan"), "high": float("nan"),
                "verdict": "one window: no interval"}
    c = compare_paired(candidate, baseline, seed=BOOTSTRAP_SEED, lower_is_better=lower_is_better)
    return {"mean": c.mean, "low": c.low, "high": c.high, "verdict": c.verdict}


def print_load(result: dict, summary: dict, load: float) -> None:
    best = summary["best_cache_aware"]
    slo = result["slo"]
    print(f"\n== {result['scenario']} ({100 * load:.0f}% load): {len(result['seeds'])} windows, "
          f"seeds {result['seeds'][0]}..{result['seeds'][-1]}, {result['wall_s']:.0f} s; SLO "
          f"TTFT {slo['ttft_s']} s, TPOT {slo['tpot_s']} s")
    print(f"{'router':>20}{'TTFT mean':>10}{'E2E p99':>9}{'goodput':>9}{'hit %':>7}"
          f"{'position':>9}  {'TTFT vs ' + best + ' [95% CI]':<34}{'E2E p99 vs best [95% CI]':<30}"
          f"{'goodput vs best [95% CI]':<28}{'<bound':>6}")

    def ci(entry: dict, key: str) -> str:
        c = entry.get("vs_best", {}).get(key)
        if c is None:
            return "(reference)"
        return f"{100 * c['mean']:+.1f}% [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"

    print(f"{'TTFT bound':>20}{summary['bound_ttft_mean']:>10.3f}{'':>25}{0.0:>9.2f}  "
          f"(nothing cached: {summary['bound_uncached_ttft_mean']:.3f} s; cacheable "
          f"{100 * summary['cacheable_fraction']:.1f}% of prompt tokens; bound within the "
          f"TTFT target for {100 * summary['bound_attainable_ttft_share']:.1f}% of requests)")
    order = sorted(summary["routers"], key=lambda n: summary["routers"][n]["ttft_mean"])
    for name in order:
        e = summary["routers"][name]
        print(f"{name:>20}{e['ttft_mean']:>10.3f}{e['e2e_p99']:>9.1f}{e['goodput_rps']:>9.3f}"
              f"{100 * e['prefix_hit_rate_tokens']:>6.1f}%{e['position']:>9.2f}  "
              f"{ci(e, 'ttft_mean'):<34}{ci(e, 'e2e_p99'):<30}{ci(e, 'goodput_rps'):<28}"
              f"{e['below_bound']:>6.0f}")
    h = summary["headroom_vs_best_ci"]
    print(f"   best cache-aware heuristic: {best}; the bound is {100 * summary['headroom_vs_best']:.1f}% "
          f"below its mean TTFT (paired: {100 * h['mean']:+.1f}% [{100 * h['low']:+.1f}, "
          f"{100 * h['high']:+.1f}])")


def headline_table(windows: int, requests: int, seed: int, trace_rows: tuple[int, int],
                   slo: dict, scenarios=HEADLINE_SCENARIOS) -> dict:
    """The headline table at every load of ``scenarios`` (see the module docstring)."""
    print(f"\n4) headline: rows {trace_rows[0]}-{trace_rows[1]} of {MOONCAKE.name}, "
          f"{windows} windows x {requests} requests per load", flush=True)
    out = {}
    for scenario, load in scenarios:
        result = headline_load(scenario, windows, requests, seed, trace_rows, slo)
        summary = summarise_load(result)
        print_load(result, summary, load)
        out[scenario] = {"load": load, "raw": result, "summary": summary}
    return out


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
                        help="episodes inside these rows of a replayed trace (held-out part; "
                             "the headline's default: 8400 12031)")
    parser.add_argument("--headline", action="store_true",
                        help="the issue-21 table: routers between the TTFT bound and round "
                             "robin at 70/80/90%% load on the Mooncake trace's held-out rows")
    parser.add_argument("--windows", type=int, default=5, help="headline: paired windows")
    parser.add_argument("--window-requests", type=int, default=500,
                        help="headline: requests per window")
    parser.add_argument("--slo-ttft", type=float, default=None,
                        help="headline: TTFT target (s; default: the scenario's)")
    parser.add_argument("--slo-tpot", type=float, default=None,
                        help="headline: TPOT target (s; default: the scenario's)")
    args = parser.parse_args()
    headline_rows = tuple(args.trace_rows) if args.trace_rows else HELD_OUT_ROWS
    slo = {k: v for k, v in (("ttft_s", args.slo_ttft), ("tpot_s", args.slo_tpot))
           if v is not None}
    if args.headline:
        if args.windows < 1:
            parser.error(f"--windows={args.windows}: must be >= 1")
        if MOONCAKE.is_file():
            try:  # refused before anything runs
                check_trace_window(MOONCAKE, headline_rows, args.window_requests)
            except ValueError as err:
                parser.error(str(err))
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
    if args.headline:
        if MOONCAKE.is_file():
            report["headline"] = headline_table(args.windows, args.window_requests, args.seed,
                                                headline_rows, slo)
        else:
            print(f"\n4) skipped: {MOONCAKE} not found")
    if args.output:
        atomic_write_json(args.output, report)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
