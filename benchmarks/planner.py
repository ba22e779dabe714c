"""The rollout planner against least_added_time, lookahead and its clairvoyant bound.

Two parts, on every scenario given:

1. **Mean E2E on paired seeds.** Every router runs the same episodes (seed ``s`` draws the same
   arrivals and lengths for all); per router the mean E2E latency over seeds, the paired
   relative difference vs ``least_added_time`` with a 95 % bootstrap interval and its verdict
   (:mod:`llm_cluster_env.tools.paired_stats`), and wall milliseconds per decision (a shared
   machine: read them as orders of magnitude).
2. **Noise of the estimate.** Along ``least_added_time`` episodes, at every
   ``noise_every``-th decision, each planner variant estimates the cost of its two best
   candidates on each sampled future; the *realised* difference replays the episode to that
   decision, takes each candidate, then routes the rest of the true episode by
   ``least_added_time``. Reported: median of ``std / |mean|`` of the per-future difference,
   and how often the sign of the estimated mean difference is the realised one.

Run: ``python benchmarks/planner.py --scenarios heterogeneous a100x4_conv_90 --seeds 10``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.routing.planner import (
    ASSIGNMENTS,
    LENGTHS,
    PlannerConfig,
    RolloutPlannerRouter,
)
from llm_cluster_env.tools.paired_stats import compare_paired


@dataclass
class Args:
    """Settings of the benchmark."""

    scenarios: list[str] = field(default_factory=lambda: ["heterogeneous", "a100x4_conv_90"])
    """packaged scenarios to run"""
    seeds: int = 10
    """paired seeds 0..seeds-1"""
    requests: int = 300
    """requests per episode"""
    horizon_s: float = 3.0
    """planner horizon (seconds)"""
    samples: int = 4
    """sampled futures per decision"""
    candidates: int = 2
    """replicas tried per decision"""
    assignment: str = "shared"
    """how the sampled arrivals are routed in the branches (shared, reroute, cross)"""
    lengths: str = "sampled"
    """output lengths in the copies (sampled, expected)"""
    switch_t: float = 0.0
    """leave the base's choice only for a saving of this many standard errors"""
    clairvoyant_assignment: str = "shared"
    """assignment of the clairvoyant planner"""
    clairvoyant_horizon_s: float = 0.0
    """horizon of the clairvoyant planner (seconds; 0 = horizon_s)"""
    routers: list[str] = field(default_factory=lambda: [
        "least_added_time", "lookahead", "rollout_planner", "planner_clairvoyant"])
    """routers of the E2E comparison (least_added_time must be among them)"""
    noise_every: int = 40
    """noise diagnostics: every this many decisions of a least_added_time episode (0 = off)"""
    noise_samples: int = 8
    """sampled futures per noise diagnostic decision"""
    noise_horizons: list[float] = field(default_factory=list)
    """also measure the clairvoyant re-routing estimate at these horizons (seconds)"""
    noise_only_horizons: bool = False
    """noise diagnostics of the horizon sweep only"""
    e2e: bool = True
    """run the paired E2E comparison"""
    out: str | None = None
    """write the results as JSON here"""


def planner_variants(args: Args) -> dict[str, PlannerConfig]:
    """The planner configurations compared (name -> config)."""
    return {
        "rollout_planner": PlannerConfig(
            horizon_s=args.horizon_s, samples=args.samples, candidates=args.candidates,
            assignment=args.assignment, lengths=args.lengths, switch_t=args.switch_t),
        "planner_clairvoyant": PlannerConfig(
            horizon_s=args.clairvoyant_horizon_s or args.horizon_s, candidates=args.candidates,
            assignment=args.clairvoyant_assignment, clairvoyant=True),
    }


def noise_variants(args: Args) -> dict[str, PlannerConfig]:
    """The estimates whose noise is measured: every assignment, sampled and expected lengths,
    and clairvoyant."""
    common = dict(horizon_s=args.horizon_s, candidates=2)
    out = {}
    for horizon in args.noise_horizons:
        out[f"clairvoyant/reroute@{horizon:g}s"] = PlannerConfig(
            clairvoyant=True, assignment="reroute", horizon_s=horizon, candidates=2)
    if args.noise_only_horizons:
        return out
    for lengths in LENGTHS:
        for assignment in ASSIGNMENTS:
            out[f"{assignment}/{lengths}"] = PlannerConfig(
                samples=args.noise_samples, assignment=assignment, lengths=lengths, **common)
    for assignment in ASSIGNMENTS:
        out[f"clairvoyant/{assignment}"] = PlannerConfig(clairvoyant=True, assignment=assignment,
                                                         **common)
    return out


def make(name: str, env: LLMClusterEnv, variants: dict[str, PlannerConfig]):
    if name in variants:
        return RolloutPlannerRouter(variants[name]).bind(env)
    return make_router(name)


def run_router(env: LLMClusterEnv, router, seed: int) -> tuple[float, float, int]:
    """One episode: mean E2E (s), CPU seconds of this process spent in ``select`` (less
    disturbed by other processes than wall time on a shared machine), decisions."""
    env.reset(seed=seed)
    router.reset(env.num_replicas, np.random.default_rng(seed + 7_919))
    done, spent, steps, info = False, 0.0, 0, {}
    while not done:
        start = time.process_time()
        action = router.select(env.view)
        spent += time.process_time() - start
        steps += 1
        _, _, done, _, info = env.step(action)
    return float(info["requests"]["e2e_s"].mean()), spent, steps


def paired_e2e(args: Args, scenario: str) -> dict:
    """Per router: mean E2E per seed and decision milliseconds."""
    env = LLMClusterEnv(scenario=scenario, episode_requests=args.requests)
    variants = planner_variants(args)
    out = {}
    for name in args.routers:
        router = make(name, env, variants)
        e2e, spent, steps = [], 0.0, 0
        for seed in range(args.seeds):
            mean, sec, n = run_router(env, router, seed)
            e2e.append(mean)
            spent += sec
            steps += n
        out[name] = {"e2e": e2e, "decision_ms": 1e3 * spent / steps}
        print(f"  {scenario} {name}: mean E2E {np.mean(e2e):.4f} s, "
              f"{1e3 * spent / steps:.2f} ms/decision", flush=True)
    return out


def follow_base_policy(env: LLMClusterEnv, seed: int, actions: list[int] | None = None,
                  steps: int | None = None):
    """Reset to ``seed`` and route with ``actions`` (replayed) or least_added_time for
    ``steps`` decisions (all when ``None``); returns the actions and the last info."""
    env.reset(seed=seed)
    base = make_router("least_added_time")
    base.reset(env.num_replicas, np.random.default_rng(0))
    taken, done, info = [], False, {}
    while not done and (steps is None or len(taken) < steps):
        action = actions[len(taken)] if actions is not None else base.select(env.view)
        taken.append(action)
        _, _, done, _, info = env.step(action)
    return taken, info


def realised_total(env: LLMClusterEnv, seed: int, prefix: list[int], choice: int) -> float:
    """Sum of E2E (s) when the episode follows ``prefix``, takes ``choice``, then
    least_added_time on the true future."""
    follow_base_policy(env, seed, prefix, len(prefix))
    _, _, done, _, info = env.step(choice)
    base = make_router("least_added_time")
    base.reset(env.num_replicas, np.random.default_rng(0))
    while not done:
        _, _, done, _, info = env.step(base.select(env.view))
    return float(info["requests"]["e2e_s"].sum())


def noise_diagnostics(args: Args, scenario: str) -> dict:
    """Per planner variant: per decision the estimated difference (mean, std over futures)
    between its two best candidates and the realised one."""
    env = LLMClusterEnv(scenario=scenario, episode_requests=args.requests)
    variants = noise_variants(args)
    rows = {name: [] for name in variants}
    for seed in range(args.seeds):
        actions, _ = follow_base_policy(env, seed)
        for d in range(args.noise_every, len(actions) - 1, args.noise_every):
            follow_base_policy(env, seed, actions, d)
            estimates = {}
            for name, cfg in variants.items():
                planner = RolloutPlannerRouter(cfg).bind(env)
                planner.reset(env.num_replicas, np.random.default_rng(seed))
                estimates[name] = planner.estimate(env.view)
            realised = {}
            for name, est in estimates.items():
                for c in est.candidates:
                    if c not in realised:
                        realised[c] = realised_total(env, seed, actions[:d], c)
                diff = est.costs[:, 1] - est.costs[:, 0]
                rows[name].append({
                    "seed": seed, "decision": d, "candidates": list(est.candidates),
                    "est_mean": float(diff.mean()), "est_std": float(diff.std()),
                    "realised": realised[est.candidates[1]] - realised[est.candidates[0]]})
    return {name: summarise_noise(r) | {"rows": r} for name, r in rows.items()}


def summarise_noise(rows: list[dict]) -> dict:
    """Per estimate: median ``std / |mean|`` of the per-future difference (candidate 2 minus
    candidate 1, request-seconds); sign agreement with the realised difference (decisions
    whose realised difference is exactly 0 left out), also weighted by ``|realised|``; the
    realised request-seconds saved by switching to candidate 2 wherever the estimate says it
    is better (``switch_gain``; negative = lost) and by an oracle that switches exactly when it
    is (``oracle_gain``), and by always switching (``always_switch_gain``)."""
    ratio = [r["est_std"] / abs(r["est_mean"]) for r in rows if r["est_mean"] != 0.0]
    signed = [r for r in rows if r["realised"] != 0.0]
    agree = np.array([np.sign(r["est_mean"]) == np.sign(r["realised"]) for r in signed])
    weight = np.array([abs(r["realised"]) for r in signed])
    nan = float("nan")
    return {
        "decisions": len(rows),
        "median_std_over_abs_mean": float(np.median(ratio)) if ratio else nan,
        "sign_agreement": float(agree.mean()) if signed else nan,
        "weighted_agreement": float(weight[agree].sum() / weight.sum()) if signed else nan,
        "switch_gain": float(sum(-r["realised"] for r in rows if r["est_mean"] < 0)),
        "oracle_gain": float(sum(max(0.0, -r["realised"]) for r in rows)),
        "always_switch_gain": float(sum(-r["realised"] for r in rows)),
        "mean_est": float(np.mean([r["est_mean"] for r in rows])) if rows else nan,
        "mean_realised": float(np.mean([r["realised"] for r in rows])) if rows else nan,
    }


def _paired(candidate, baseline) -> tuple[str, str]:
    cmp = compare_paired(candidate, baseline)
    return f"{cmp.mean:+.2%} [{cmp.low:+.2%}, {cmp.high:+.2%}]", cmp.verdict


def e2e_table(results: dict) -> str:
    """Per scenario and router: mean E2E over seeds, the paired difference vs
    least_added_time and vs lookahead (95 % bootstrap CI, verdict), ms per decision."""
    lines = ["| scenario | router | mean E2E s | vs least_added_time [95% CI] | verdict | "
             "vs lookahead [95% CI] | verdict | ms/decision |", "|---|---|---|---|---|---|---|---|"]
    for scenario, routers in results.items():
        base = routers["least_added_time"]["e2e"]
        look = routers["lookahead"]["e2e"] if "lookahead" in routers else None
        for name, r in routers.items():
            vs_base = ("—", "—") if name == "least_added_time" else _paired(r["e2e"], base)
            vs_look = ("—", "—") if look is None or name == "lookahead" \
                else _paired(r["e2e"], look)
            lines.append(f"| {scenario} | {name} | {np.mean(r['e2e']):.4f} | {vs_base[0]} | "
                         f"{vs_base[1]} | {vs_look[0]} | {vs_look[1]} | "
                         f"{r['decision_ms']:.3f} |")
    return "\n".join(lines)


def noise_table(results: dict) -> str:
    lines = ["| scenario | estimate | decisions | median std/|mean| | sign agreement | "
             "weighted agreement | switch gain req·s | oracle gain | always-switch gain | "
             "mean est. diff | mean realised diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, variants in results.items():
        for name, s in variants.items():
            lines.append(f"| {scenario} | {name} | {s['decisions']} | "
                         f"{s['median_std_over_abs_mean']:.2f} | {s['sign_agreement']:.0%} | "
                         f"{s['weighted_agreement']:.0%} | {s['switch_gain']:+.1f} | "
                         f"{s['oracle_gain']:.1f} | {s['always_switch_gain']:+.1f} | "
                         f"{s['mean_est']:+.2f} | "
                         f"{s['mean_realised']:+.2f} |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    results = {"args": asdict(args), "e2e": {}, "noise": {}}
    for scenario in args.scenarios:
        if args.noise_every:
            results["noise"][scenario] = noise_diagnostics(args, scenario)
            print(noise_table({scenario: results["noise"][scenario]}), flush=True)
        if args.e2e:
            results["e2e"][scenario] = paired_e2e(args, scenario)
    if results["e2e"]:
        print(e2e_table(results["e2e"]))
    if results["noise"]:
        print(noise_table(results["noise"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Args()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, list):
            kind = float if name == "noise_horizons" else str
            parser.add_argument(flag, nargs="+", type=kind, default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str,
                                default=value)
    return Args(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
