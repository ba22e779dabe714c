"""The trained warm-started policy against every heuristic on every packaged scenario.

For each scenario: train with ``train/warmstart.py``'s pipeline (the scenario's profile in
``configs/warmstart.yaml`` if it has one, else ``default`` with the scenario swapped in), then
evaluate the policy and all heuristics on the same held-out seeds. Prints one line per scenario:
PPO's mean and p99 E2E, ``lor``'s, the best heuristic's, and the relative differences; writes
``<output-dir>/summary.json`` and a markdown table.

Usage: ``python benchmarks/policy_vs_heuristics.py [--scenarios all] [--requests N]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from llm_cluster_env.scenarios import available_scenarios
from sb3_warmstart.pipeline.config import load_config
from sb3_warmstart.pipeline.runner import RunOptions, WarmStartPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "warmstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="all")
    parser.add_argument("--requests", type=int, default=None,
                        help="PPO env steps per scenario (default: the profile's budget)")
    parser.add_argument("--episodes", type=int, default=5, help="held-out episodes per router")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", choices=["recurrent_ppo", "ppo"], default=None)
    parser.add_argument("--output-dir", default="runs/bench_policy_vs_heuristics")
    args = parser.parse_args()
    scenarios = available_scenarios() if args.scenarios == "all" else args.scenarios.split(",")
    profiles = yaml.safe_load(CONFIG.read_text())["LLMCluster-v0"]
    out = Path(args.output_dir)
    rows = {}
    for scenario in scenarios:
        profile = scenario if scenario in profiles else "default"
        overrides = {"seed": args.seed, "env_kwargs": {"scenario": scenario},
                     "evaluation": {"episodes": args.episodes}}
        if args.requests:
            overrides["total_requests"] = args.requests
        if args.algorithm:
            overrides["ppo"] = {"algorithm": args.algorithm}
        config = load_config(CONFIG, profile, overrides)
        summary = WarmStartPipeline(config, RunOptions(output_dir=out / scenario, progress=False,
                                                       command=["benchmark", scenario])).run()
        routers = summary["routers"]
        heuristics = {k: v for k, v in routers.items() if k not in ("ppo", "bc_clone")}
        best = min(heuristics, key=lambda k: heuristics[k]["e2e_mean"])
        ppo, lor = routers["ppo"], routers["lor"]
        rows[scenario] = {
            "profile": profile,
            "ppo_e2e_mean": ppo["e2e_mean"], "ppo_e2e_p99": ppo["e2e_p99"],
            "clone_e2e_mean": routers.get("bc_clone", {}).get("e2e_mean"),
            "lor_e2e_mean": lor["e2e_mean"], "lor_e2e_p99": lor["e2e_p99"],
            "best_heuristic": best, "best_e2e_mean": heuristics[best]["e2e_mean"],
            "best_e2e_p99": heuristics[best]["e2e_p99"],
            "ppo_vs_lor_mean": ppo["e2e_mean"] / lor["e2e_mean"] - 1,
            "ppo_vs_lor_p99": ppo["e2e_p99"] / lor["e2e_p99"] - 1,
            "ppo_vs_best_mean": ppo["e2e_mean"] / heuristics[best]["e2e_mean"] - 1,
            "wall_s": summary["timings"]["total_s"],
        }
        (out / "summary.json").write_text(json.dumps(rows, indent=2))
    lines = ["| scenario | PPO mean / p99 (s) | lor mean / p99 | best heuristic | PPO vs lor "
             "(mean, p99) | PPO vs best |", "|---|---|---|---|---|---|"]
    for scenario, r in rows.items():
        lines.append(
            f"| {scenario} | {r['ppo_e2e_mean']:.3f} / {r['ppo_e2e_p99']:.2f} | "
            f"{r['lor_e2e_mean']:.3f} / {r['lor_e2e_p99']:.2f} | {r['best_heuristic']} "
            f"{r['best_e2e_mean']:.3f} / {r['best_e2e_p99']:.2f} | "
            f"{100 * r['ppo_vs_lor_mean']:+.1f}%, {100 * r['ppo_vs_lor_p99']:+.1f}% | "
            f"{100 * r['ppo_vs_best_mean']:+.1f}% |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
