"""Cold-start PPO vs warm-started PPO on one scenario, same seed and budget, in one run.

Prints and writes (``<output-dir>/summary.json``, ``learning_curves.png``):

* the **start**: the initial policy (cold: SB3's fresh initialisation; warm: the behaviour
  clone), acting stochastically as in its first rollout, on three training-length episodes —
  its dispatch balance and mean E2E latency against ``lor`` on the same episodes; plus the first
  post-stabilisation training rollout's balance from the training history;
* the **learning curves** of both runs (training-episode mean E2E against env steps, ``lor`` on
  the same episodes as a dashed line) in one PNG;
* **steps to converge**, from a moving mean of training-episode latency: to the cold
  start's final latency (mean of its last 8 episodes), and to within 2% of ``lor`` on the same
  episodes; ``null`` = not reached within the budget (the design documents claim 3-5x faster
  convergence with a warm start);
* the **final evaluation** of both trained policies on held-out seeds vs ``lor``.

Usage: ``python benchmarks/warmstart_vs_coldstart.py [--scenario a100x4_conv_70]
[--requests 49152] [--output-dir runs/bench_warm_vs_cold]``. Rerunning with the same
``--output-dir`` reuses the finished runs: the pipeline resumes them and only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import run_episode
from sb3_warmstart.pipeline.config import load_config
from sb3_warmstart.pipeline.ppo_stage import build_session
from sb3_warmstart.pipeline.report import episode_curve
from sb3_warmstart.pipeline.runner import RunOptions, WarmStartPipeline
from sb3_warmstart.policies.router import PolicyRouter

REPO_ROOT = Path(__file__).resolve().parents[1]
WINDOW = 8  # training episodes in the "final latency" mean
WINDOW_POINTS = 4  # episode-end steps in the moving mean (4 envs x 4 = 16 episodes)


def train(profile: str, scenario: str, requests: int, out: Path, seed: int):
    """Run the pipeline (or, when ``out`` already holds a finished run, resume it: the
    pipeline then only re-evaluates)."""
    overrides = {"total_requests": requests, "seed": seed, "env_kwargs": {"scenario": scenario}}
    config = load_config(REPO_ROOT / "configs" / "warmstart.yaml", profile, overrides)
    pipeline = WarmStartPipeline(config, RunOptions(output_dir=out, progress=False,
                                                    command=["benchmark", profile]))
    summary = pipeline.run()
    if pipeline.pretrained is None and profile != "cold_start":
        pipeline.pretrained = rebuild_pretrained(out)
    return pipeline, summary


def rebuild_pretrained(out: Path):
    """The clone of an earlier run (a resumed pipeline does not load it)."""
    from sb3_warmstart.pipeline.warm_start_stage import Pretrained
    from sb3_warmstart.policies.policy_file import load_pretrained

    model, meta, obs_rms = load_pretrained(out / "pretrained" / "bc_policy.zip")
    return Pretrained(model.policy, obs_rms, None, str(out), meta["bc_metrics"]["final"])


def initial_policy_stats(pipeline, seeds) -> dict[str, float]:
    """Balance and mean E2E of the policy PPO starts from, sampling as in a rollout."""
    if pipeline.pretrained is not None:
        policy, obs_rms = pipeline.pretrained.policy, pipeline.pretrained.obs_rms
    else:  # rebuild the untrained model with the run's seed: SB3's fresh initialisation
        torch.manual_seed(pipeline.config.seed)
        fresh = build_session(pipeline.config, None).model
        policy, obs_rms = fresh.policy, fresh.get_vec_normalize_env().obs_rms
    env = LLMClusterEnv(config=pipeline.config.env)
    router = PolicyRouter(policy, obs_rms, deterministic=False, name="initial")
    metrics = [run_episode(env, router, s)[0] for s in seeds]
    lor = [run_episode(env, make_router("lor"), s)[0] for s in seeds]
    e2e, lor_e2e = np.mean([m["e2e_mean"] for m in metrics]), np.mean([m["e2e_mean"]
                                                                       for m in lor])
    return {"balance": float(np.mean([m["balance"] for m in metrics])), "e2e_mean": float(e2e),
            "lor_e2e_mean": float(lor_e2e), "vs_lor": float(e2e / lor_e2e - 1.0)}


def first_policy_rollout(pipeline) -> dict[str, float]:
    rows = monitor_of(pipeline).history_rows("rollout")
    threshold = pipeline.config.stabilization.stabilization_steps
    for row in rows:
        if row["num_timesteps"] - row["steps"] >= threshold:  # started after stabilisation
            return {"num_timesteps": row["num_timesteps"], "balance": row["balance"]}
    return {}


def monitor_of(pipeline):
    return pipeline.session.callbacks["monitor"]


def plot_runs(curves, path: Path, baselines, title: str) -> None:
    """Training-episode mean E2E of several runs against env steps, heuristics as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        steps, means, moving = episode_curve(rows)
        line, = ax.plot(steps, means, alpha=0.3)
        ax.plot(steps, moving, color=line.get_color(), lw=2, label=f"{name} (moving mean)")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, linestyle="--", color=f"C{7 + i}", label=f"{name} (other seeds)")
    ax.set_xlabel("env steps (routed requests)")
    ax.set_ylabel("mean E2E latency per training episode (s)")
    ax.set_title(title + "\ntraining episodes, actions sampled", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def steps_to_reach(rows, target: float) -> float | None:
    """First env step at which the moving mean of training latency is at or below target."""
    steps, _, moving = episode_curve(rows)
    hits = np.flatnonzero(moving[WINDOW_POINTS - 1:] <= target)
    return float(steps[WINDOW_POINTS - 1 + hits[0]]) if hits.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="a100x4_conv_70")
    parser.add_argument("--requests", type=int, default=49152, help="PPO env steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench_warm_vs_cold")
    args = parser.parse_args()
    out = Path(args.output_dir) / args.scenario
    warm, warm_summary = train("default", args.scenario, args.requests, out / "warm", args.seed)
    cold, cold_summary = train("cold_start", args.scenario, args.requests, out / "cold",
                               args.seed)
    seeds = [900_000 + i for i in range(3)]
    result: dict = {"scenario": args.scenario, "ppo_env_steps": args.requests}
    for name, pipeline, summary in (("warm", warm, warm_summary), ("cold", cold, cold_summary)):
        episodes = monitor_of(pipeline).history_rows("episode")
        result[name] = {
            "initial_policy": initial_policy_stats(pipeline, seeds),
            "first_policy_rollout": first_policy_rollout(pipeline),
            "final_training_e2e": float(np.mean([r["e2e_mean"] for r in episodes[-WINDOW:]])),
            "eval_vs_lor": summary["comparison"]["ppo_vs_lor"],
            "eval_e2e_mean": summary["routers"]["ppo"]["e2e_mean"],
            "wall_s": summary["timings"].get("total_s"),
        }
    cold_final = result["cold"]["final_training_e2e"]
    near_lor = 1.02 * result["warm"]["initial_policy"]["lor_e2e_mean"]
    for name, pipeline in (("warm", warm), ("cold", cold)):
        rows = monitor_of(pipeline).history_rows("episode")
        result[name]["steps_to_cold_final"] = steps_to_reach(rows, cold_final)
        result[name]["steps_to_within_2pct_of_lor"] = steps_to_reach(rows, near_lor)
    w, c = (result["warm"]["steps_to_within_2pct_of_lor"],
            result["cold"]["steps_to_within_2pct_of_lor"])
    result["speedup_to_lor_level"] = (c / w) if (w and c) else (
        f">= {args.requests / w:.0f}x (cold start not within 2% of lor in {args.requests} steps)"
        if w and not c else None)
    lor_line = {"lor": result["warm"]["initial_policy"]["lor_e2e_mean"]}
    plot_runs({"warm start": monitor_of(warm).history_rows("episode"),
               "cold start": monitor_of(cold).history_rows("episode")},
              out / "learning_curves.png", baselines=lor_line,
              title=f"{args.scenario}: warm vs cold start")
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {out}/learning_curves.png and summary.json")


if __name__ == "__main__":
    main()
