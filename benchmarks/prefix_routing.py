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
4. ``--headline``: the issue-21 table, per cell: the Mooncake trace's held-out rows
   (``--trace-rows``, default 8,400-12,031) at 70/80/90% load (``mooncake_conv_70``,
   ``mooncake_conv``, ``mooncake_conv_90``) and the generator settings no training run sampled
   (the ``prefix_holdout_*`` scenarios when they exist, else :data:`STANDIN_GENERATOR_CELLS`;
   ``--cells``). ``--windows`` paired windows of ``--window-requests`` requests (seeds from
   ``--seed``: the same trace windows, or the same generated episodes, for every router). Rows:
   every cache-aware heuristic, ``least_added_time``, ``least_tokens``, ``lor``, round robin,
   ``lookahead`` and ``lookahead_ttft``, the rollout planner per ``--planner-objectives``
   (default ``mean_ttft`` and ``goodput``; clairvoyant, marked ``*``, where the workload model
   cannot sample futures: trace replay, multi-turn sessions; ``--planner-samples``,
   ``--planner-horizon-s``, ``--planner-candidates`` and ``--planner-mode`` set its cost), and
   ``--policy`` run folders. Columns: mean TTFT, p99 and mean E2E, SLO goodput at the run's
   targets and at the scenario's own ("alt"), prefix hit rate, the share of the headroom
   captured between round robin and the per-request TTFT lower bound
   (:mod:`llm_cluster_env.tools.ttft_bounds`), ``(rr - router) / (rr - bound)`` of mean TTFT
   (1 = at the bound, 0 = round robin), 95% bootstrap intervals of the paired per-window
   relative differences against the best cache-aware heuristic (by mean TTFT; a verdict word
   only where the interval excludes 0), the aim check (:class:`Aim`: >= 10% lower mean TTFT,
   shown; p99 E2E <= +2%; mean E2E not shown worse; at 90% load goodput >= +10%, shown), CPU
   milliseconds per decision, and requests finishing below their bound (a check; 0 expected).
   Bad settings are refused, naming the flag and value, before anything runs.

Usage: ``python -m benchmarks.prefix_routing [--episodes 3] [--requests 2000]
[--scenarios mooncake_conv multiturn_chat shared_system_prompt] [--capacity] [--lru] [--host]
[--output runs/prefix_routing.json] [--policy RUN_DIR] [--trace-rows 8400 12031]``.
``python -m benchmarks.prefix_routing --headline --no-compare [--windows 10]
[--window-requests 500] [--cells all] [--slo-ttft S] [--slo-tpot S]
[--planner-objectives mean_ttft,goodput]`` runs the headline table alone.
``--policy`` adds trained routers (run folders) to the comparison; ``--trace-rows`` evaluates
on a part of a replayed trace (the ``prefix`` profile trains on rows 0-8400 of the Mooncake
trace and is evaluated on rows 8400-12031). The Mooncake scenarios read
``../shared/data/mooncake/conversation_trace.jsonl`` beside the repository; they are skipped
with a message when it is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import time_episode
from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.config import SLOConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.routing.heuristics import (
    CACHE_AWARE_ROUTERS,
    ROUTERS,
    SessionAffinityRouter,
    make_router,
)
from llm_cluster_env.routing.planner import PlannerConfig, RolloutPlannerRouter
from llm_cluster_env.routing.prefix_index import ApproximatePrefixIndex
from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
from llm_cluster_env.scenarios import load_scenario_dict
from llm_cluster_env.tools.evaluation import evaluate_routers, run_episode
from llm_cluster_env.tools.objectives import OBJECTIVES
from llm_cluster_env.tools.paired_stats import compare_paired
from llm_cluster_env.tools.ttft_bounds import ttft_bounds
from llm_cluster_env.validation import require
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

#: Rows of the trace the ``prefix`` profile never trains on.
HELD_OUT_ROWS = (8400, 12031)
#: The prefix training family's held-out generator settings (another part of issue 21 adds
#: them); until they exist :data:`STANDIN_GENERATOR_CELLS` stand in for them.
HOLDOUT_SCENARIO_GLOB = "prefix_holdout_*.yaml"
HEADLINE_HEURISTICS = (*CACHE_AWARE_ROUTERS, "least_ttft", "least_added_time", "least_tokens",
                       "lor", "round_robin")
#: Look-ahead rows (``lookahead_ttft``: the look-ahead scoring first tokens).
HEADLINE_LOOKAHEADS = ("lookahead", "lookahead_ttft")
#: Planner objectives run by default (``rollout_planner_<suffix>``).
HEADLINE_PLANNER_OBJECTIVES = ("mean_ttft", "goodput")
_PLANNER_SUFFIX = {"mean_e2e": "", "mean_ttft": "_ttft", "ttft_e2e": "_ttft_e2e",
                   "goodput": "_goodput"}
#: Per-episode metrics of the headline table: key, label, lower is better.
HEADLINE_METRICS = (("ttft_mean", "TTFT mean s", True), ("e2e_p99", "E2E p99 s", True),
                    ("e2e_mean", "E2E mean s", True), ("goodput_rps", "goodput/s", False),
                    ("goodput_alt_rps", "goodput (alt SLO)/s", False),
                    ("prefix_hit_rate_tokens", "hit %", False))
#: Metrics with a paired interval against the best cache-aware heuristic.
PAIRED_METRICS = ("ttft_mean", "e2e_p99", "e2e_mean", "goodput_rps", "goodput_alt_rps")
#: Seed of the bootstrap resampling generator (intervals are reproducible).
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Aim:
    """Issue 21's aim against the best cache-aware heuristic (fractions of its value).

    :param ttft_cut: mean TTFT at least this much lower (0.10 = 10%), and shown lower.
    :param p99_slack: p99 E2E at most this much higher (point estimate).
    :param goodput_gain: goodput at least this much higher, and shown higher (checked on the
        cells whose load is at least ``goodput_load``).
    :param goodput_load: load from which the goodput half applies (0.9 = 90%).
    """

    ttft_cut: float = 0.10
    p99_slack: float = 0.02
    goodput_gain: float = 0.10
    goodput_load: float = 0.9

    def __post_init__(self) -> None:
        for key in ("ttft_cut", "p99_slack", "goodput_gain", "goodput_load"):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and np.isfinite(value) and value >= 0,
                    f"aim.{key}", value, "must be a finite fraction >= 0")


@dataclass(frozen=True)
class HeadlineCell:
    """One column group of the headline table.

    :param label: the cell's name in the table.
    :param scenario: the scenario it starts from.
    :param load: offered load against the capacity with caching off (fraction; None unknown).
    :param workload: overrides of the scenario's workload (a generator setting).
    :param trace_rows: ``[start, end)`` rows of a replayed trace the windows are cut from.
    """

    label: str
    scenario: str
    load: float | None = None
    workload: tuple[tuple[str, object], ...] = ()
    trace_rows: tuple[int, int] | None = None

    def env_kwargs(self, requests: int, slo: dict) -> dict:
        """``LLMClusterEnv`` kwargs of a window of ``requests`` requests."""
        workload = {**load_scenario_dict(self.scenario)["workload"], **dict(self.workload)}
        if self.trace_rows is not None:
            workload["trace_rows"] = list(self.trace_rows)
        kwargs = {"scenario": self.scenario, "episode_requests": requests, "workload": workload}
        if slo:
            kwargs["slo"] = dict(slo)
        return kwargs


def mooncake_cells(trace_rows: tuple[int, int] = HELD_OUT_ROWS) -> tuple[HeadlineCell, ...]:
    """The trace's held-out rows at 70/80/90% load."""
    return tuple(HeadlineCell(name, name, load, (), tuple(trace_rows)) for name, load in
                 (("mooncake_conv_70", 0.7), ("mooncake_conv", 0.8), ("mooncake_conv_90", 0.9)))


#: Generator settings no training run sampled, until the ``prefix_holdout_*`` scenarios exist:
#: longer, faster sessions; more tenants with flatter popularity and longer system prompts.
STANDIN_GENERATOR_CELLS = (
    HeadlineCell("multiturn_chat_turns6_gap30s", "multiturn_chat", 0.7,
                 (("multiturn", {"turns_mean": 6.0, "turn_gap_s": 30.0}),)),
    HeadlineCell("shared_system_prompt_256tenants_zipf0.8", "shared_system_prompt", 0.7,
                 (("system_prompt", {"num_prompts": 256, "zipf_s": 0.8,
                                     "prompt_tokens_range": [512, 4096]}),)),
)


def generator_cells(scenario_dir: Path | None = None) -> tuple[HeadlineCell, ...]:
    """The held-out generator cells: every ``prefix_holdout_*.yaml`` scenario that does not
    replay a trace, when there are any, else :data:`STANDIN_GENERATOR_CELLS`."""
    if scenario_dir is None:
        import llm_cluster_env.scenarios as scenarios

        scenario_dir = Path(scenarios.__file__).parent
    found = [p.stem for p in sorted(scenario_dir.glob(HOLDOUT_SCENARIO_GLOB))
             if _arrival(p) != "trace"]  # the held-out trace rows are the Mooncake cells
    if not found:
        return STANDIN_GENERATOR_CELLS
    return tuple(HeadlineCell(name, name) for name in found)


def _arrival(path: Path) -> str:
    """The ``workload.arrival`` of a scenario file (``"poisson"`` when not set)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return (data.get("workload") or {}).get("arrival", "poisson")


@dataclass(frozen=True)
class PlannerRows:
    """The planner rows of the headline table and what each costs.

    :param objectives: planner objectives run (``rollout_planner_<objective suffix>``).
    :param samples: sampled futures per decision (sampled mode).
    :param horizon_s: seconds of future arrivals per rollout.
    :param candidates: replicas tried per decision.
    :param mode: ``"auto"`` (sampled futures where the workload model can draw them: Poisson or
        gamma arrivals without multi-turn sessions; clairvoyant otherwise), ``"sampled"`` or
        ``"clairvoyant"``.
    """

    objectives: tuple[str, ...] = HEADLINE_PLANNER_OBJECTIVES
    samples: int = 4
    horizon_s: float = 3.0
    candidates: int = 2
    mode: str = "auto"

    def __post_init__(self) -> None:
        for name in self.objectives:
            require(name in OBJECTIVES, "--planner-objectives", name,
                    f"unknown objective (known: {', '.join(OBJECTIVES)})")
        require(self.mode in ("auto", "sampled", "clairvoyant"), "--planner-mode", self.mode,
                "must be auto, sampled or clairvoyant")
        PlannerConfig(samples=self.samples, horizon_s=self.horizon_s,
                      candidates=self.candidates)  # the planner's own checks

    def clairvoyant(self, workload: dict) -> bool:
        """Whether the planner runs clairvoyant on a cell with this workload dict."""
        if self.mode != "auto":
            return self.mode == "clairvoyant"
        return workload.get("arrival", "poisson") not in ("poisson", "gamma") \
            or workload.get("prefix", "none") == "multiturn"

    def factories(self, workload: dict) -> dict:
        """Row name -> router factory for a cell with this workload dict."""
        clairvoyant = self.clairvoyant(workload)
        out = {}
        for objective in self.objectives:
            name = "rollout_planner" + _PLANNER_SUFFIX[objective] + ("*" if clairvoyant else "")
            config = PlannerConfig(objective=objective, samples=self.samples,
                                   horizon_s=self.horizon_s, candidates=self.candidates,
                                   clairvoyant=clairvoyant)
            out[name] = (lambda c=config: RolloutPlannerRouter(c))
        return out


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


def router_factories(workload: dict, planner: PlannerRows | None, policies: dict | None,
                     lookaheads: tuple[str, ...] = HEADLINE_LOOKAHEADS) -> dict:
    """Every row's router factory, in table order: heuristics, look-aheads, planners, policies."""
    out = {name: (lambda n=name: make_any_router(n))
           for name in (*HEADLINE_HEURISTICS, *lookaheads)}
    if planner is not None:
        out.update(planner.factories(workload))
    out.update(policies or {})
    return out


def scenario_slo(scenario: str) -> tuple[float, float]:
    """The scenario's own SLO targets (TTFT s, TPOT s per token)."""
    slo = SLOConfig(**load_scenario_dict(scenario).get("slo", {}))
    return slo.ttft_s, slo.tpot_s


def window_bound(requests, replica_configs, ttft_slo_s: float) -> dict:
    """The TTFT bounds of one window: per-request ``bounds`` and its means."""
    b = ttft_bounds(requests, replica_configs)
    prompt = np.array([r.prompt_tokens for r in requests], dtype=np.float64)
    return {"bounds": b, "cached": float(b.cached.mean()), "uncached": float(b.uncached.mean()),
            "attainable": float(np.mean(b.cached <= ttft_slo_s)),
            "cacheable_fraction": float(b.cacheable_tokens.sum() / prompt.sum())}


def headline_cell(cell: HeadlineCell, windows: int, requests: int, seed: int, slo: dict,
                  factories: dict) -> dict:
    """Every router of ``factories`` on ``windows`` paired windows (seeds ``seed``...) of
    ``cell``, and the TTFT bound of each window. Per router and window: the
    :data:`HEADLINE_METRICS`, the requests whose TTFT is below their bound, and CPU seconds
    per decision."""
    env = LLMClusterEnv(**cell.env_kwargs(requests, slo))
    seeds = list(range(seed, seed + windows))
    ttft_slo, tpot_slo = env.config.slo.ttft_s, env.config.slo.tpot_s
    alt_ttft, alt_tpot = scenario_slo(cell.scenario)
    per_router: dict[str, dict[str, list[float]]] = {}
    bound: dict[str, list[float]] = {"cached": [], "uncached": [], "attainable": [],
                                     "cacheable_fraction": []}
    bounds_of_seed = {}
    start = time.perf_counter()
    for name, factory in factories.items():
        rows: dict[str, list[float]] = {key: [] for key, _, _ in HEADLINE_METRICS}
        rows.update(below_bound=[], wall_s=[], cpu_ms_per_decision=[])
        for s in seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            metrics, latencies = run_episode(env, factory(), s)
            rows["wall_s"].append(time.perf_counter() - t0)
            rows["cpu_ms_per_decision"].append(1e3 * (time.process_time() - c0) / requests)
            if s not in bounds_of_seed:  # the workload depends on the seed only
                bounds_of_seed[s] = window_bound(env.cluster.requests,
                                                 env.config.replica_configs, ttft_slo)
                for key in bound:
                    bound[key].append(bounds_of_seed[s][key])
            b = bounds_of_seed[s]["bounds"]
            lower = b.cached[np.searchsorted(b.request_id, latencies.request_id)]
            rows["below_bound"].append(float(np.count_nonzero(latencies.ttft < lower - 1e-9)))
            met = np.count_nonzero((latencies.ttft <= alt_ttft)
                                   & (np.isnan(latencies.tpot) | (latencies.tpot <= alt_tpot)))
            metrics = {**metrics, "goodput_alt_rps": met / max(metrics["makespan_s"], 1e-12)}
            for key, _, _ in HEADLINE_METRICS:
                rows[key].append(float(metrics[key]))
        per_router[name] = rows
        print(f"   {cell.label}: {name} done ({sum(rows['wall_s']):.0f} s, "
              f"{np.mean(rows['cpu_ms_per_decision']):.2f} ms CPU/decision)", flush=True)
    return {"cell": cell.label, "scenario": cell.scenario, "load": cell.load,
            "trace_rows": list(cell.trace_rows) if cell.trace_rows else None,
            "workload_overrides": dict(cell.workload), "requests": requests, "seeds": seeds,
            "routers": per_router, "bound": bound,
            "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo},
            "alt_slo": {"ttft_s": alt_ttft, "tpot_s": alt_tpot},
            "wall_s": time.perf_counter() - start}


def best_cache_aware(means: dict) -> str:
    """The cache-aware heuristic of least mean TTFT among ``means`` (name -> metric means)."""
    present = [n for n in CACHE_AWARE_ROUTERS if n in means]
    if not present:
        raise ValueError(f"routers={sorted(means)}: none of the cache-aware heuristics "
                         f"{CACHE_AWARE_ROUTERS} ran")
    return min(present, key=lambda n: means[n]["ttft_mean"])


def headroom_captured(router: float, round_robin: float, bound: float) -> float:
    """Fraction of the TTFT headroom between round robin and the bound a router captures:
    ``(round_robin - router) / (round_robin - bound)`` (1 = at the bound, 0 = round robin)."""
    gap = round_robin - bound
    return (round_robin - router) / gap if gap > 0 else float("nan")


def aim_check(entry: dict, aim: Aim, load: float | None) -> dict:
    """Which halves of :class:`Aim` a row's paired comparisons (``entry["vs_best"]``) meet.

    TTFT: mean relative difference <= ``-ttft_cut`` and its interval below 0; p99 E2E: mean
    <= ``p99_slack``; mean E2E: no worse (its interval not wholly above 0); goodput (cells at
    ``goodput_load`` or more only, else ``None``): mean >= ``goodput_gain`` and its interval
    above 0. ``met`` = all that apply.
    """
    vs = entry["vs_best"]
    ttft, p99, e2e, good = vs["ttft_mean"], vs["e2e_p99"], vs["e2e_mean"], vs["goodput_rps"]
    out = {"ttft": ttft["mean"] <= -aim.ttft_cut and ttft["high"] < 0,
           "p99": p99["mean"] <= aim.p99_slack,
           "e2e": not e2e["low"] > 0,
           "goodput": (good["mean"] >= aim.goodput_gain and good["low"] > 0)
           if load is not None and load >= aim.goodput_load - 1e-9 else None}
    out["met"] = all(v for v in out.values() if v is not None)
    return out


def aim_against_every(vs_each: dict, aim: Aim, load: float | None) -> dict:
    """:func:`aim_check` against *every* cache-aware heuristic (``vs_each``: heuristic ->
    metric -> paired entry): each half holds only if it holds against each of them, so the
    TTFT half is judged against the lowest TTFT, the p99 half against the best tail, the
    goodput half against the highest goodput, whichever heuristics those are."""
    checks = [aim_check({"vs_best": vs}, aim, load) for vs in vs_each.values()]
    out = {key: (None if checks[0][key] is None else all(c[key] for c in checks))
           for key in ("ttft", "p99", "e2e", "goodput")}
    out["met"] = all(v for v in out.values() if v is not None)
    return out


def summarise_cell(result: dict, aim: Aim = Aim()) -> dict:
    """Means over windows, headroom captured between round robin and the bound, the best
    cache-aware heuristic, paired intervals against it, the aim check and the headroom the
    bound leaves."""
    routers, bound = result["routers"], result["bound"]
    means = {name: {key: float(np.mean(v)) for key, v in rows.items()}
             for name, rows in routers.items()}
    best = best_cache_aware(means)
    floor = float(np.mean(bound["cached"]))
    rr = means["round_robin"]["ttft_mean"] if "round_robin" in means else float("nan")
    out: dict = {"best_cache_aware": best, "bound_ttft_mean": floor,
                 "bound_uncached_ttft_mean": float(np.mean(bound["uncached"])),
                 "bound_attainable_ttft_share": float(np.mean(bound["attainable"])),
                 "cacheable_fraction": float(np.mean(bound["cacheable_fraction"])),
                 "headroom_vs_best": 1.0 - floor / means[best]["ttft_mean"],
                 "headroom_vs_best_ci": paired(bound["cached"], routers[best]["ttft_mean"], True),
                 "aim_ttft_target_s": (1.0 - aim.ttft_cut) * means[best]["ttft_mean"],
                 "routers": {}}
    lower = {key: low for key, _, low in HEADLINE_METRICS}
    cache_aware = [n for n in CACHE_AWARE_ROUTERS if n in routers]

    def against(name: str, reference: str) -> dict:
        return {key: paired(routers[name][key], routers[reference][key], lower[key])
                for key in PAIRED_METRICS}

    for name, row in means.items():
        entry = dict(row)
        entry["captured"] = headroom_captured(row["ttft_mean"], rr, floor)
        if name != best:
            entry["vs_best"] = against(name, best)
            entry["aim"] = aim_check(entry, aim, result.get("load"))
        if name not in cache_aware:
            entry["vs_each"] = {h: entry["vs_best"] if h == best else against(name, h)
                                for h in cache_aware}
            entry["aim_every"] = aim_against_every(entry["vs_each"], aim, result.get("load"))
        out["routers"][name] = entry
    return out


def paired(candidate, baseline, lower_is_better: bool) -> dict:
    """Mean relative difference with its 95% bootstrap interval (fixed-seed resampling)."""
    if len(candidate) < 2:
        diff = (np.asarray(candidate) - np.asarray(baseline)) / np.asarray(baseline)
        return {"mean": float(diff.mean()), "low": float("nan"), "high": float("nan"),
                "verdict": "one window: no interval"}
    c = compare_paired(candidate, baseline, seed=BOOTSTRAP_SEED, lower_is_better=lower_is_better)
    return {"mean": c.mean, "low": c.low, "high": c.high, "verdict": c.verdict}


def ci_text(comparison: dict | None) -> str:
    """``-12.3% [-15.0, -9.1] better``; the verdict word only when the interval excludes 0."""
    if comparison is None:
        return "(reference)"
    text = (f"{100 * comparison['mean']:+.1f}% [{100 * comparison['low']:+.1f}, "
            f"{100 * comparison['high']:+.1f}]")
    if comparison["verdict"] in ("better", "worse"):
        text += " " + comparison["verdict"]
    return text


def aim_text(aim: dict | None) -> str:
    """``yes`` or the halves missed (``no: TTFT, p99``)."""
    if aim is None:
        return ""
    missed = [label for key, label in (("ttft", "TTFT"), ("p99", "p99"), ("e2e", "E2E"),
                                       ("goodput", "goodput")) if aim[key] is False]
    return "yes" if aim["met"] else "no: " + ", ".join(missed)


def format_cell(result: dict, summary: dict) -> list[str]:
    """The cell's table as Markdown lines (rows by mean TTFT, the bound first)."""
    best = summary["best_cache_aware"]
    slo, alt = result["slo"], result["alt_slo"]
    load = f"{100 * result['load']:.0f}% load, " if result.get("load") else ""
    lines = [f"#### {result['cell']} ({load}{len(result['seeds'])} paired windows of "
             f"{result['requests']} requests, {result['wall_s']:.0f} s; SLO TTFT {slo['ttft_s']} "
             f"s / TPOT {slo['tpot_s']} s, alt SLO {alt['ttft_s']} s / {alt['tpot_s']} s)", "",
             f"| router | TTFT mean s | E2E p99 s | E2E mean s | goodput/s | goodput alt/s "
             f"| hit | captured | TTFT vs `{best}` [95% CI] | E2E p99 vs best | E2E mean vs best "
             f"| goodput vs best | aim | aim vs every cache-aware | ms CPU/dec |",
             "|" + "---|" * 15]
    lines.append(f"| **TTFT bound** | {summary['bound_ttft_mean']:.3f} | | | | | "
                 f"({100 * summary['cacheable_fraction']:.1f}% cacheable) | 1 | "
                 f"{ci_text(summary['headroom_vs_best_ci'])} | | | | | | |")
    entries = summary["routers"]
    for name in sorted(entries, key=lambda n: entries[n]["ttft_mean"]):
        e = entries[name]
        vs = e.get("vs_best", {})
        label = f"**`{name}`**" if name == best else f"`{name}`"
        lines.append(
            f"| {label} | {e['ttft_mean']:.3f} | {e['e2e_p99']:.1f} | {e['e2e_mean']:.2f} | "
            f"{e['goodput_rps']:.3f} | {e['goodput_alt_rps']:.3f} | "
            f"{100 * e['prefix_hit_rate_tokens']:.1f}% | {e['captured']:.2f} | "
            f"{ci_text(vs.get('ttft_mean'))} | {ci_text(vs.get('e2e_p99'))} | "
            f"{ci_text(vs.get('e2e_mean'))} | {ci_text(vs.get('goodput_rps'))} | "
            f"{aim_text(e.get('aim'))} | {aim_text(e.get('aim_every'))} | "
            f"{e['cpu_ms_per_decision']:.2f} |")
    h = summary["headroom_vs_best"]
    below = sum(e["below_bound"] * len(result["seeds"]) for e in entries.values())
    lines += ["", f"Best cache-aware heuristic: `{best}`. The bound is {100 * h:.1f}% below its "
              f"mean TTFT (aim: <= {summary['aim_ttft_target_s']:.3f} s); nothing cached the "
              f"bound is {summary['bound_uncached_ttft_mean']:.3f} s; bound within the TTFT "
              f"target for {100 * summary['bound_attainable_ttft_share']:.1f}% of requests; "
              f"requests below their bound: {below:.0f}. \"aim\" is judged against `{best}`; "
              f"\"aim vs every cache-aware\" against each of "
              f"{', '.join(f'`{h}`' for h in CACHE_AWARE_ROUTERS if h in entries)} (so the tail "
              f"half against the best tail, the goodput half against the highest goodput). "
              f"`*` = clairvoyant planner (true future arrivals and lengths)."]
    return lines


def headline_table(windows: int, requests: int, seed: int, slo: dict,
                   cells: tuple[HeadlineCell, ...], planner: PlannerRows | None,
                   policies: dict | None = None, aim: Aim = Aim(),
                   lookaheads: tuple[str, ...] = HEADLINE_LOOKAHEADS) -> dict:
    """The headline table of every cell (see the module docstring)."""
    print(f"\n4) headline: {windows} paired windows x {requests} requests per cell", flush=True)
    out = {}
    for cell in cells:
        workload = {**load_scenario_dict(cell.scenario)["workload"], **dict(cell.workload)}
        factories = router_factories(workload, planner, policies, lookaheads)
        result = headline_cell(cell, windows, requests, seed, slo, factories)
        summary = summarise_cell(result, aim)
        print("\n" + "\n".join(format_cell(result, summary)), flush=True)
        out[cell.label] = {"load": cell.load, "raw": result, "summary": summary}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
                             "robin on held-out trace rows and generator settings")
    parser.add_argument("--cells", default="all",
                        help="headline cells: comma-separated labels, 'mooncake', 'generator' "
                             "or 'all'")
    parser.add_argument("--windows", type=int, default=10, help="headline: paired windows")
    parser.add_argument("--window-requests", type=int, default=500,
                        help="headline: requests per window")
    parser.add_argument("--slo-ttft", type=float, default=None,
                        help="headline: TTFT target (s; default: the scenario's)")
    parser.add_argument("--slo-tpot", type=float, default=None,
                        help="headline: TPOT target (s; default: the scenario's)")
    parser.add_argument("--planner-objectives", default=",".join(HEADLINE_PLANNER_OBJECTIVES),
                        help="headline: planner objectives, comma-separated ('' = no planner)")
    parser.add_argument("--planner-samples", type=int, default=4)
    parser.add_argument("--planner-horizon-s", type=float, default=3.0)
    parser.add_argument("--planner-candidates", type=int, default=2)
    parser.add_argument("--planner-mode", default="auto",
                        help="headline: auto (clairvoyant where futures cannot be sampled), "
                             "sampled or clairvoyant")
    parser.add_argument("--lookaheads", default=",".join(HEADLINE_LOOKAHEADS),
                        help="headline: look-ahead rows, comma-separated ('' = none)")
    return parser.parse_args(argv)


def select_cells(spec: str, trace_rows: tuple[int, int]) -> tuple[HeadlineCell, ...]:
    """The headline cells named by ``--cells`` (refused naming the value on a miss)."""
    known = (*mooncake_cells(trace_rows), *generator_cells())
    groups = {"all": known, "mooncake": mooncake_cells(trace_rows),
              "generator": generator_cells()}
    by_label = {c.label: (c,) for c in known}
    out: list[HeadlineCell] = []
    for label in spec.split(","):
        require(label in groups or label in by_label, "--cells", label,
                f"unknown cell (known: all, mooncake, generator, {', '.join(by_label)})")
        out.extend(c for c in groups.get(label, by_label.get(label, ())) if c not in out)
    return tuple(out)


def headline_settings(args: argparse.Namespace) -> tuple[tuple[HeadlineCell, ...],
                                                          PlannerRows | None, dict]:
    """Cells, planner rows and SLO of the headline run; every bad value refused (``ConfigError``
    naming the flag and value) before anything runs."""
    require(args.windows >= 1, "--windows", args.windows, "must be >= 1")
    rows = tuple(args.trace_rows) if args.trace_rows else HELD_OUT_ROWS
    cells = select_cells(args.cells, rows)
    if any(c.trace_rows for c in cells) and MOONCAKE.is_file():
        check_trace_window(MOONCAKE, rows, args.window_requests)
    objectives = tuple(o for o in args.planner_objectives.split(",") if o)
    planner = PlannerRows(objectives, args.planner_samples, args.planner_horizon_s,
                          args.planner_candidates, args.planner_mode) if objectives else None
    for name in (n for n in args.lookaheads.split(",") if n):
        require(name in ALL_ROUTERS, "--lookaheads", name,
                f"unknown router (known: {', '.join(ALL_ROUTERS)})")
    slo = {k: v for k, v in (("ttft_s", args.slo_ttft), ("tpot_s", args.slo_tpot))
           if v is not None}
    if slo:
        SLOConfig(**slo)  # targets <= 0 refused here
    return cells, planner, slo


def refuse(message: str) -> None:
    """Exit with status 2 and ``message`` on stderr, as argparse refuses."""
    print(f"prefix_routing: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.headline:
        try:  # refused before anything runs
            cells, planner, slo = headline_settings(args)
        except ValueError as err:
            refuse(str(err))
    names = None
    if args.routers:
        names = args.routers.split(",")
        unknown = [n for n in names if n not in ROUTERS]
        if unknown or "lor" not in names or not set(names) & set(CACHE_AWARE_ROUTERS):
            refuse(f"--routers {args.routers!r}: unknown {unknown}, or lor or a cache-aware "
                   "router missing")
    policies = {}
    if args.policy:
        from benchmarks.generalisation import load_policy_routers

        policies = load_policy_routers(args.policy)
    report: dict = {"args": vars(args)}
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
        if not MOONCAKE.is_file():
            skipped = [c.label for c in cells if c.trace_rows]
            if skipped:
                print(f"\n4) {', '.join(skipped)} skipped: {MOONCAKE} not found")
            cells = tuple(c for c in cells if not c.trace_rows)
        lookaheads = tuple(n for n in args.lookaheads.split(",") if n)
        report["headline"] = headline_table(args.windows, args.window_requests, args.seed, slo,
                                            cells, planner, policies, lookaheads=lookaheads)
    if args.output:
        atomic_write_json(args.output, report)
        print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
