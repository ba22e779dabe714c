"""A router trained by RL Zoo (``configs/zoo/*.yml``) against the heuristics, greedy actions.

Loads the zoo's output folder (``<folder>/<algo>/LLMCluster-v0_<id>/``: the final
``LLMCluster-v0.zip`` and ``LLMCluster-v0/vecnormalize.pkl`` with its ``config.yml``), rebuilds
the training environment from the saved ``env_kwargs``, and routes held-out episodes (seeds
100000.., the first ones training never drew: the zoo seeds its envs from ``--seed``) with the
deterministic policy, as ``rl_zoo3.enjoy --deterministic`` would; the heuristics route the same
episodes. Prints the table (mean / p99 E2E, balance = ``1 - std`` of the dispatch shares) and
the policy's mean E2E relative to ``lor``; writes ``summary.json`` beside the model.

The KL-regularised algorithms (``klppo``, ``klppo_lstm``: ``configs/zoo/klppo*.yml``, trained
through ``python -m sb3_warmstart.algorithms.zoo train ...``) load the same way.

Run it in the zoo's venv (``make .venv-zoo/.installed``)::

    .venv-zoo/bin/python -m rl_zoo3.train --algo ppo --env LLMCluster-v0 \\
        --gym-packages llm_cluster_env --conf-file configs/zoo/ppo.yml -f runs/zoo \\
        --eval-freq -1 --seed 0 --num-threads 1
    .venv-zoo/bin/python benchmarks/zoo_router.py runs/zoo/ppo/LLMCluster-v0_1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_env.atomic import atomic_write_json  # noqa: E402
from llm_cluster_env.env.observation import ClusterView  # noqa: E402
from llm_cluster_env.routing.heuristics import make_router  # noqa: E402
from llm_cluster_env.tools.evaluation import evaluate_routers, format_table  # noqa: E402

ENV_ID = "LLMCluster-v0"
HEURISTICS = ("lor", "round_robin", "random", "least_tokens")


class ZooPolicyRouter:
    """A zoo-trained SB3 policy as a router: observations normalised with the saved
    ``VecNormalize`` statistics, greedy actions; an LSTM policy keeps its state over the
    episode (reset by :meth:`reset`)."""

    name = "zoo_policy"

    def __init__(self, model, obs_rms, clip_obs: float, epsilon: float) -> None:
        self.model = model
        self.obs_rms = obs_rms
        self.clip_obs = clip_obs
        self.epsilon = epsilon
        self.recurrent = hasattr(model.policy, "lstm_actor")
        self._state = None
        self._start = True

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        self._state = None
        self._start = True

    def select(self, view: ClusterView) -> int:
        obs = np.asarray(view.obs, dtype=np.float32)
        if self.obs_rms is not None:
            obs = np.clip((obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon),
                          -self.clip_obs, self.clip_obs).astype(np.float32)
        if self.recurrent:
            action, self._state = self.model.predict(
                obs[None], state=self._state, episode_start=np.array([self._start]),
                deterministic=True)
            self._start = False
            return int(action[0])
        action, _ = self.model.predict(obs, deterministic=True)
        return int(action)


def load_zoo_run(folder: Path) -> tuple[Any, dict[str, Any], str]:
    """(model, env_kwargs, algo) of a zoo output folder; fails naming what is missing."""
    import yaml

    model_path = folder / f"{ENV_ID}.zip"
    config_path = folder / ENV_ID / "config.yml"
    for path in (model_path, config_path):
        if not path.is_file():
            raise SystemExit(f"{folder}: no {path.relative_to(folder)} (is it a finished "
                             f"rl_zoo3.train run of {ENV_ID}?)")
    # config.yml is an ordered list of [key, value] pairs written by the zoo
    hyperparams = dict(yaml.load(config_path.read_text(), Loader=yaml.UnsafeLoader))
    algo = folder.parent.name
    if algo == "ppo":
        from stable_baselines3 import PPO as algorithm
    elif algo == "ppo_lstm":
        from sb3_contrib import RecurrentPPO as algorithm
    elif algo in ("klppo", "klppo_lstm"):
        from sb3_warmstart.algorithms.zoo import ZOO_ALGOS

        algorithm = ZOO_ALGOS[algo]
    else:
        raise SystemExit(f"{folder}: algorithm {algo!r} (from the folder name) is not ppo, "
                         "ppo_lstm, klppo or klppo_lstm")
    model = algorithm.load(model_path, device="cpu")
    return model, dict(hyperparams.get("env_kwargs") or {}), algo


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the zoo's run folder, "
                        "e.g. runs/zoo/ppo/LLMCluster-v0_1")
    parser.add_argument("--episodes", type=int, default=5, help="held-out episodes per router")
    parser.add_argument("--episode-requests", type=int, default=2000,
                        help="requests per held-out episode")
    parser.add_argument("--seed", type=int, default=100_000, help="first held-out seed")
    args = parser.parse_args(argv)
    import torch as th

    th.set_num_threads(1)
    model, env_kwargs, algo = load_zoo_run(args.run)
    obs_rms, clip_obs, epsilon = None, 10.0, 1e-8
    stats_path = args.run / ENV_ID / "vecnormalize.pkl"
    if stats_path.is_file():
        import pickle

        with open(stats_path, "rb") as f:
            vec_normalize = pickle.load(f)
        if vec_normalize.norm_obs:
            obs_rms, clip_obs, epsilon = (vec_normalize.obs_rms, vec_normalize.clip_obs,
                                          vec_normalize.epsilon)
    env_kwargs = {**env_kwargs, "episode_requests": args.episode_requests}
    policy = ZooPolicyRouter(model, obs_rms, clip_obs, epsilon)
    routers = {f"zoo_{algo}": lambda: policy,
               **{name: (lambda n=name: make_router(n)) for name in HEURISTICS}}
    seeds = list(range(args.seed, args.seed + args.episodes))
    results = evaluate_routers(env_kwargs, routers, seeds)
    table = format_table(results)
    lor = results["lor"].mean("e2e_mean")
    mine = results[f"zoo_{algo}"]
    summary = {
        "run": str(args.run), "algo": algo, "env_kwargs": env_kwargs, "seeds": seeds,
        "num_timesteps": int(model.num_timesteps),
        "policy_e2e_mean": mine.mean("e2e_mean"), "policy_e2e_p99": mine.mean("e2e_p99"),
        "policy_balance": mine.mean("balance"), "lor_e2e_mean": lor,
        "policy_vs_lor": mine.mean("e2e_mean") / lor - 1.0,
        "routers": {name: {"e2e_mean": r.mean("e2e_mean"), "e2e_p99": r.mean("e2e_p99"),
                           "balance": r.mean("balance")} for name, r in results.items()},
    }
    print(f"{ENV_ID} {env_kwargs}, {algo} after {summary['num_timesteps']:,} steps, "
          f"{len(seeds)} held-out episodes (greedy actions)")
    print(table)
    print(f"policy vs lor: {100 * summary['policy_vs_lor']:+.1f}% mean E2E, balance "
          f"{summary['policy_balance']:.3f}")
    atomic_write_json(args.run / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
