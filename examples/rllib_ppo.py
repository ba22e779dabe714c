"""Train ``LLMCluster-v0`` with RLlib's PPO on remote env runners.

RLlib builds each environment inside its env-runner actors, separate processes (on a cluster,
other machines) that never ran this script's ``import llm_cluster_env``: gymnasium's registry
there has no ``LLMCluster-v0`` and ``gym.make`` fails with ``NameNotFound: Environment
`LLMCluster` doesn't exist``. Two ways make the workers see it (``--registration``):

* ``register_env`` (default): ``ray.tune.registry.register_env(name, creator)`` stores the
  creator in Ray's registry, which every worker reads; the creator imports
  ``llm_cluster_env`` where it runs, i.e. in the worker, then calls ``gym.make``.
* ``module_id``: the env id ``"llm_cluster_env:LLMCluster-v0"``; gymnasium imports the module
  before the lookup, in whichever process makes the env.

Either way the workers need the package installed (``pip install llm-cluster-rl``, or
``runtime_env={"py_modules": [...]}`` on a cluster). Observations go through RLlib's
``MeanStdFilter`` (their scales span 1e-3 to 1e2); the environment settings and the short
credit horizon (gamma 0.9, lambda 0.8) are those of ``configs/zoo/ppo.yml`` (why: README, RL
Zoo), with rewards scaled by 0.01 (a 512-request episode returns about -2,700
request-seconds unscaled) for RLlib's value function; every finished episode's
mean E2E latency and dispatch balance (``info["metrics"]``) are logged as custom metrics.
After training, the greedy policy is evaluated on ``--eval-episodes`` episodes of
``--eval-episode-requests`` requests by a separate evaluation env runner (RLlib would otherwise
evaluate on the local training runner, with the training episodes' length and exploration on),
and compared with ``lor`` on the same episodes (the same workload seeds).

Run it as a script: Ray ships the env creator and the callback defined here to the workers by
value only from ``__main__`` (imported as a module, they travel by name and each worker must
be able to import this file). In the ray venv (``make .venv-ray/.installed``)::

    .venv-ray/bin/python examples/rllib_ppo.py --iterations 20
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import gymnasium as gym
import numpy as np

ENV_NAME = "LLMCluster-v0"
MODULE_ENV_ID = "llm_cluster_env:LLMCluster-v0"
# the evaluation env (both --registration modes): episodes on fixed seeds, those of lor_baseline
EVAL_ENV_NAME = "LLMCluster-v0-eval"
EVAL_SEED = 100_000


def make_env(env_config: dict[str, Any]) -> gym.Env:
    """The env creator RLlib calls in each env runner: the import registers the env in the
    process that runs it."""
    import llm_cluster_env  # noqa: F401

    return gym.make(ENV_NAME, **dict(env_config))


class SeededEpisodes(gym.Wrapper):
    """Starts its episodes on ``seeds`` in turn, whatever seed RLlib passes: the evaluation
    runner's episodes are then the ones ``lor_baseline`` runs."""

    def __init__(self, env: gym.Env, seeds: list[int]) -> None:
        super().__init__(env)
        self._seeds = list(seeds)
        self._next = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        seed = self._seeds[self._next % len(self._seeds)]
        self._next += 1
        return self.env.reset(seed=seed, options=options)


def make_eval_env(env_config: dict[str, Any]) -> gym.Env:
    """The evaluation env creator: ``make_env`` on the config without ``episode_seeds``,
    whose seeds start the episodes in turn."""
    config = dict(env_config)
    seeds = config.pop("episode_seeds")
    return SeededEpisodes(make_env(config), seeds)


def episode_metrics_callback():
    """An RLlib callback class logging each finished episode's ``info["metrics"]`` (mean E2E
    seconds, balance) as custom metrics (built lazily: RLlib is an optional dependency)."""
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class EpisodeMetrics(RLlibCallback):
        def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
            info = episode.get_infos(-1)
            metrics = info.get("metrics") if isinstance(info, dict) else None
            if metrics and metrics_logger is not None:
                for key in ("e2e_mean", "balance"):
                    metrics_logger.log_value(key, float(metrics[key]), reduce="mean")

    return EpisodeMetrics


def build_config(args: argparse.Namespace):
    """The RLlib PPO config: ``args.env_runners`` remote env runners, a local learner."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module.mean_std_filter import MeanStdFilter
    from ray.tune.registry import register_env

    # the environment settings of configs/zoo/ppo.yml (see the README's RL Zoo section): the
    # imbalance term gives each decision an immediate signal; rewards scaled to O(1)
    env_config = {"scenario": args.scenario, "episode_requests": args.episode_requests,
                  "reward": {"scale": 0.01, "imbalance_penalty": 20.0},
                  "observation": {"dispatch_share_window": 16}}
    if args.registration == "register_env":
        register_env(ENV_NAME, make_env)
        env = ENV_NAME
    else:
        env = MODULE_ENV_ID
    register_env(EVAL_ENV_NAME, make_eval_env)
    eval_env_config = {**env_config, "episode_requests": args.eval_episode_requests,
                       "episode_seeds": eval_seeds(args)}
    return (
        PPOConfig()
        .environment(env, env_config=env_config)
        .env_runners(num_env_runners=args.env_runners, num_envs_per_env_runner=1,
                     num_cpus_per_env_runner=1, create_env_on_local_worker=True,
                     # RLlib's 60 s default drops a runner's whole sample when a busy
                     # machine makes it slower: the iteration then reports 0 env steps
                     sample_timeout_s=args.sample_timeout,
                     env_to_module_connector=lambda env, spaces=None, device=None:
                         MeanStdFilter())
        .learners(num_learners=0)
        .training(lr=args.lr, gamma=0.9, lambda_=0.8,
                  train_batch_size_per_learner=args.train_batch_size,
                  minibatch_size=min(256, args.train_batch_size), num_epochs=args.epochs,
                  entropy_coeff=0.0, vf_clip_param=100.0)
        .callbacks(episode_metrics_callback())
        # One remote evaluation runner (no CPU reserved: it samples only after training). With
        # none, RLlib evaluates on the local *training* runner, ignoring evaluation_config (its
        # env, episode length and explore=False).
        .evaluation(evaluation_interval=None, evaluation_num_env_runners=1,
                    evaluation_duration=args.eval_episodes, evaluation_duration_unit="episodes",
                    evaluation_sample_timeout_s=args.sample_timeout,
                    evaluation_config={"explore": False, "use_worker_filter_stats": False,
                                       "num_cpus_per_env_runner": 0,
                                       "env": EVAL_ENV_NAME, "env_config": eval_env_config})
        .debugging(seed=args.seed)
    )


def eval_seeds(args: argparse.Namespace) -> list[int]:
    """The workload seeds of the evaluation episodes (the policy's and ``lor``'s)."""
    return list(range(EVAL_SEED, EVAL_SEED + args.eval_episodes))


def lor_baseline(args: argparse.Namespace) -> float:
    """``lor``'s mean E2E (s) over the evaluation episodes (``eval_seeds``)."""
    from llm_cluster_env.routing.heuristics import make_router
    from llm_cluster_env.tools.evaluation import evaluate_routers

    seeds = eval_seeds(args)
    results = evaluate_routers({"scenario": args.scenario,
                                "episode_requests": args.eval_episode_requests},
                               {"lor": lambda: make_router("lor")}, seeds)
    return results["lor"].mean("e2e_mean")


def _get(result: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="training iterations")
    parser.add_argument("--env-runners", type=int, default=2, help="remote env runners (>= 1)")
    parser.add_argument("--registration", choices=["register_env", "module_id"],
                        default="register_env", help="how the workers find the env")
    parser.add_argument("--scenario", default="a100x4_conv_70")
    parser.add_argument("--episode-requests", type=int, default=512)
    parser.add_argument("--train-batch-size", type=int, default=4000, help="env steps/iteration")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-episodes", type=int, default=2)
    parser.add_argument("--eval-episode-requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-timeout", type=float, default=600.0,
                        help="seconds an env runner may take to sample its share of a batch")
    parser.add_argument("--address", help="a running Ray cluster (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--summary-json", help="also write the summary (training history, "
                        "evaluation) to this JSON file")
    args = parser.parse_args(argv)
    for name in ("iterations", "env_runners", "train_batch_size", "epochs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    import ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        algo = build_config(args).build_algo()
        history = []
        start = time.perf_counter()
        for i in range(args.iterations):
            result = algo.train()
            row = {"iteration": i + 1,
                   "env_steps": _get(result, "num_env_steps_sampled_lifetime"),
                   "episode_return_mean": _get(result, "env_runners", "episode_return_mean"),
                   "e2e_mean": _get(result, "env_runners", "e2e_mean"),
                   "balance": _get(result, "env_runners", "balance"),
                   "remote_env_runners": algo.env_runner_group.num_healthy_remote_workers()}
            history.append(row)
            print(f"[rllib] iteration {row['iteration']}: {row['env_steps']} env steps, "
                  f"return {row['episode_return_mean']}, mean E2E {row['e2e_mean']} s, "
                  f"balance {row['balance']} ({row['remote_env_runners']} remote env "
                  f"runners, {time.perf_counter() - start:.0f} s)", flush=True)
        evaluation = algo.evaluate()
        policy_e2e = _get(evaluation, "env_runners", "e2e_mean")
        balance = _get(evaluation, "env_runners", "balance")
        episode_len = _get(evaluation, "env_runners", "episode_len_mean")
        lor = lor_baseline(args)
        summary = {"history": history, "eval_e2e_mean": policy_e2e, "eval_balance": balance,
                   "eval_episode_len_mean": episode_len,
                   "lor_e2e_mean": lor,
                   "eval_vs_lor": (policy_e2e / lor - 1.0) if policy_e2e else None}
        print(f"[rllib] greedy policy on {args.eval_episodes} episodes of "
              f"{args.eval_episode_requests} requests (mean length {episode_len}, seeds "
              f"{eval_seeds(args)}): mean E2E {policy_e2e} s, balance "
              f"{balance}; lor {lor:.3f} s ({100 * summary['eval_vs_lor']:+.1f}%)"
              if policy_e2e else "[rllib] evaluation reported no episode", flush=True)
        algo.stop()
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
        return summary
    finally:
        ray.shutdown()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
