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
    from sb3_warmstart.pipeline.config import EvaluationConfig  # the main job's report's

    defaults = EvaluationConfig()
    p = argparse.ArgumentParser(prog="train/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint dir or pretrained zip")
    p.add_argument("--scenario", help="evaluate on this scenario (default: the training one)")
    p.add_argument("--replicas", type=int, help="override the number of replicas")
    p.add_argument("--qps", type=float, help="override the arrival rate, requests/s")
    p.add_argument("--episodes", type=int,
                   help=f"held-out episodes per router (default {defaults.episodes})")
    p.add_argument("--seed", type=int, help=f"first held-out seed (default {defaults.seed})")
    p.add_argument("--episode-requests", type=int,
                   help=f"requests per episode (default {defaults.episode_requests})")
    p.add_argument("--routers", help="comma-separated heuristics, or 'all' (default: "
                                     f"{', '.join(defaults.routers) or 'all'})")
    p.add_argument("--output-dir", help="report folder (default: <run>/report-<scenario>)")
    return p


def evaluation_config(args: argparse.Namespace):
    """The :class:`~sb3_warmstart.pipeline.config.EvaluationConfig` the flags ask for (its
    defaults where a flag is absent), validated once."""
    from llm_cluster_env.validation import from_dict
    from sb3_warmstart.pipeline.config import EvaluationConfig

    fields = {"episodes": args.episodes, "seed": args.seed,
              "episode_requests": args.episode_requests,
              "routers": (None if args.routers is None else [] if args.routers == "all"
                          else args.routers.split(","))}
    return from_dict(EvaluationConfig, {k: v for k, v in fields.items() if v is not None},
                     path="evaluation")


def environment_config(training_env_kwargs: dict[str, Any], args: argparse.Namespace,
                       episode_requests: int | None):
    """The environment to evaluate on: the training one (or ``--scenario``) with the flags'
    overrides, resolved once into an :class:`~llm_cluster_env.config.EnvConfig`."""
    from llm_cluster_env.config import EnvConfig
    from llm_cluster_env.validation import deep_merge

    env_kwargs = {"scenario": args.scenario} if args.scenario else dict(training_env_kwargs)
    overrides: dict[str, Any] = {}
    if args.replicas is not None:
        overrides["num_replicas"] = args.replicas
    if args.qps is not None:
        overrides["workload"] = {"qps": args.qps}
    if episode_requests is not None:
        overrides["episode_requests"] = episode_requests
    return EnvConfig.from_kwargs(**deep_merge(env_kwargs, overrides))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    from llm_cluster_env.config import ConfigError

    try:
        evaluation = evaluation_config(args)
    except ConfigError as err:
        parser.error(str(err))
    model_path = Path(args.model)
    if not model_path.exists():
        parser.error(f"--model={args.model!r}: no such file or folder")

    import torch

    from llm_cluster_env.atomic import atomic_write_json
    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.validation import to_dict
    from sb3_warmstart.pipeline.report import POLICY_NAME, evaluate_policy, write_report
    from sb3_warmstart.policies.replica_set import SET_POLICIES
    from sb3_warmstart.policies.router import PolicyRouter
    from sb3_warmstart.policies.run_loading import load_policy

    torch.set_num_threads(1)
    try:
        model, obs_rms, training_env_kwargs, history, label = load_policy(model_path)
    except Exception as err:  # a damaged or foreign file: say what and where
        parser.error(f"--model={args.model!r}: cannot load a policy from it: {err}")
    if args.scenario:
        history = []  # the training curves belong to another scenario
    try:
        env_config = environment_config(dict(training_env_kwargs), args,
                                         evaluation.episode_requests)
    except (ConfigError, TypeError) as err:
        parser.error(f"environment: {err}")
    env = LLMClusterEnv(config=env_config)
    any_size = isinstance(model.policy, SET_POLICIES)  # routes clusters of any size
    if not any_size and (env.observation_space.shape != model.observation_space.shape
                         or env.action_space.n != model.action_space.n):
        parser.error(f"--model={args.model!r} expects observations {model.observation_space.shape}"
                     f" and {model.action_space.n} actions; the environment has "
                     f"{env.observation_space.shape} and {env.action_space.n} (another number "
                     "of replicas or observation options)")
    seeds = list(range(evaluation.seed, evaluation.seed + evaluation.episodes))
    results = evaluate_policy({POLICY_NAME: PolicyRouter(model, obs_rms, name=POLICY_NAME)},
                              {"config": env_config}, list(evaluation.router_names), seeds)
    scenario = env_config.name
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
                           notes={"evaluation": f"{evaluation.episodes} held-out episodes "
                                                f"(seeds {seeds[0]}..{seeds[-1]}) of "
                                                f"{env_config.episode_requests} requests"})
    print(f"== {label} on {scenario}")
    print(summary["table"])
    print(f"report: {out}")
    atomic_write_json(out / "env_kwargs.json", to_dict(env_config))
    return summary


if __name__ == "__main__":
    main()
