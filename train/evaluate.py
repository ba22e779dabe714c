"""Evaluate a saved policy against every heuristic and write the report.

``--model`` accepts:

* a run folder of ``train/warmstart.py`` (``final_model.zip`` + ``final_vecnormalize.pkl``;
  its ``training_history.csv`` adds the learning-curve and dispatch plots);
* a checkpoint directory (``checkpoints/step_<n>``);
* a pretrained checkpoint written by ``train/pretrain.py`` (observation statistics embedded).

The environment defaults to the one the policy was trained on (the run's ``config.yaml`` or the
checkpoint's metadata); ``--scenario`` and friends evaluate it elsewhere, provided the
observation layout fits (same number of replicas and features). Examples::

    python train/evaluate.py --model runs/default
    python train/evaluate.py --model runs/default --scenario a100x4_conv_90 --episodes 5
    python train/evaluate.py --model runs/bc_lor.zip --scenario bursty
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint dir or pretrained zip")
    p.add_argument("--scenario", help="evaluate on this scenario (default: the training one)")
    p.add_argument("--replicas", type=int, help="override the number of replicas")
    p.add_argument("--qps", type=float, help="override the arrival rate, requests/s")
    from sb3_warmstart.pipeline.config import EvaluationConfig  # the main job's report uses the same

    defaults = EvaluationConfig()
    p.add_argument("--episodes", type=int, default=defaults.episodes,
                   help="held-out episodes per router (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="first held-out seed (default %(default)s)")
    p.add_argument("--episode-requests", type=int, default=defaults.episode_requests,
                   help="requests per episode (default %(default)s)")
    p.add_argument("--routers", default="all", help="comma-separated heuristics or 'all'")
    p.add_argument("--output-dir", help="report folder (default: <run>/report-<scenario>)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--episodes", args.episodes), ("--episode-requests",
                                                        args.episode_requests),
                        ("--replicas", args.replicas)):
        if value is not None and value < 1:
            parser.error(f"{flag}={value}: must be >= 1")
    if args.qps is not None and not args.qps > 0:
        parser.error(f"--qps={args.qps}: must be > 0 requests/s")
    from llm_cluster_env.routing.heuristics import ROUTERS

    heuristics = list(ROUTERS) if args.routers == "all" else args.routers.split(",")
    for name in heuristics:
        if name not in ROUTERS:
            parser.error(f"--routers: unknown router {name!r} (known: {', '.join(ROUTERS)})")
    model_path = Path(args.model)
    if not model_path.exists():
        parser.error(f"--model={args.model!r}: no such file or folder")

    import gymnasium as gym
    import torch

    import llm_cluster_env
    from llm_cluster_env.atomic import atomic_write_json
    from llm_cluster_env.config import ConfigError
    from sb3_warmstart.pipeline.report import POLICY_NAME, evaluate_policy, write_report
    from sb3_warmstart.policies.router import PolicyRouter

    torch.set_num_threads(1)
    from sb3_warmstart.policies.io import load_policy
    from sb3_warmstart.policies.replica_set import SET_POLICIES

    try:
        model, obs_rms, env_kwargs, history, label = load_policy(model_path)
    except Exception as err:  # a damaged or foreign file: say what and where
        parser.error(f"--model={args.model!r}: cannot load a policy from it: {err}")
    env_kwargs = dict(env_kwargs)
    training_env_kwargs = dict(env_kwargs)
    if args.scenario:
        env_kwargs = {"scenario": args.scenario}
        history = []  # the training curves belong to another scenario
    if args.replicas is not None:
        env_kwargs["num_replicas"] = args.replicas
    if args.qps is not None:
        env_kwargs["workload"] = {**env_kwargs.get("workload", {}), "qps": args.qps}
    env_kwargs["episode_requests"] = args.episode_requests
    try:
        env = gym.make(llm_cluster_env.ENV_ID, **env_kwargs)
    except (ConfigError, TypeError) as err:
        parser.error(f"environment {env_kwargs}: {err}")
    any_size = isinstance(model.policy, SET_POLICIES)  # routes clusters of any size
    if not any_size and (env.observation_space.shape != model.observation_space.shape
                         or env.action_space.n != model.action_space.n):
        parser.error(f"--model={args.model!r} expects observations {model.observation_space.shape}"
                     f" and {model.action_space.n} actions; the environment has "
                     f"{env.observation_space.shape} and {env.action_space.n} (another number "
                     "of replicas or observation options)")
    seeds = list(range(args.seed, args.seed + args.episodes))
    results = evaluate_policy({POLICY_NAME: PolicyRouter(model, obs_rms, name=POLICY_NAME)},
                              env_kwargs, heuristics, seeds)
    scenario = env.unwrapped.config.name
    if args.output_dir:
        out = Path(args.output_dir)
    elif model_path.is_dir() and (model_path / "final_model.zip").is_file():
        out = model_path / f"report-{scenario}"
    elif model_path.is_dir():  # a checkpoint: keep its directory untouched
        out = model_path.parent.parent / f"report-{scenario}-{model_path.name}"
    else:
        out = model_path.parent / f"report-{scenario}-{model_path.stem}"
    lor_by_seed = None
    seeds_seen = [int(r["episode_seed"]) for r in history
                  if r.get("kind") == "episode" and "episode_seed" in r]
    if seeds_seen:  # lor on the arrivals of every training episode: the paired curve
        from llm_cluster_env.config import EnvConfig
        from sb3_warmstart.pipeline.report import heuristic_on_episodes

        lor_by_seed = heuristic_on_episodes(EnvConfig.from_kwargs(**training_env_kwargs), "lor",
                                            seeds_seen)
    summary = write_report(out, results, title=f"{label} on {scenario}", history=history,
                           lor_by_seed=lor_by_seed,
                           notes={"evaluation": f"{args.episodes} held-out episodes (seeds "
                                                f"{seeds[0]}..{seeds[-1]}) of "
                                                f"{args.episode_requests} requests"})
    print(f"== {label} on {scenario}")
    print(summary["table"])
    print(f"report: {out}")
    atomic_write_json(out / "env_kwargs.json", env_kwargs)
    return summary


if __name__ == "__main__":
    main()
