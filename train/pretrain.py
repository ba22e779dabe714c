"""Behaviour-clone heuristic demonstrations into the (Recurrent)PPO policy and save it.

Typical use::

    python train/collect_demos.py --policy lor --steps 20000 --episode-requests 256 \\
        --output demos/lor
    python train/pretrain.py --demo demos/lor --mode standard --policy-type lstm \\
        --output runs/bc_lor.zip --eval-episodes 4

``--demo`` is a directory written by ``imitation.data.serialize.save`` (what
``train/collect_demos.py`` writes). When ``<demo>/stats.json`` exists, the env keyword
arguments, the observation schema and (for a single-policy set) the expert router are read
from it, and ``--scenario/--replicas/--qps`` must not be given; otherwise those flags build the
env that defines the observation and action spaces. The demos' observation width and the env's
schema are checked against each other before training.

``--mode`` picks a preset (:data:`sb3_warmstart.warmstart.bc.PRESETS`: architecture and BC
hyperparameters); ``--epochs/--batch-size/--lr/--sequence-length`` override it. Observations are
normalised with statistics fitted on all demonstrations, exactly as ``VecNormalize`` will
normalise them during PPO; with ``--norm-reward`` (default) the value head is fitted on
discounted returns of VecNormalize-normalised rewards. The checkpoint
(:mod:`sb3_warmstart.policies.io`) embeds those statistics, the schema, the BC metrics, the demo
provenance, the resolved arguments and this command.

All arguments are checked before any work; a bad value exits with status 2 and a message naming
the flag and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.scenarios import available_scenarios
from sb3_warmstart.warmstart.bc import PRESETS
from sb3_warmstart.pipeline.config import BCConfig, ConfigError, PPOConfig, WarmStartConfig
from sb3_warmstart.warmstart.demos import read_stats

DEFAULT_SCENARIO = "a100x4_conv_70"
#: BCConfig fields that have a flag here.
BC_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "learning_rate": "--lr",
            "sequence_length": "--sequence-length"}
EVAL_SEED_BASE = 1_000_000  # held-out episode seeds start here (demos use other seeds)


@dataclass
class Args:
    """Resolved command-line arguments."""

    demo: str
    """demonstration directory (imitation.data.serialize.save format)"""
    output: str
    """checkpoint path (an SB3 model zip with embedded metadata; .zip appended if no suffix)"""
    mode: str = "standard"
    """preset: standard or enhanced (architecture + BC hyperparameters)"""
    policy_type: str = "lstm"
    """lstm (RecurrentPPO's MlpLstmPolicy) or mlp (PPO's MlpPolicy)"""
    epochs: int | None = None
    """passes over the training trajectories (default: the preset's)"""
    batch_size: int | None = None
    """sequences per gradient step (default: the preset's)"""
    lr: float | None = None
    """AdamW learning rate (default: the preset's)"""
    sequence_length: int | None = None
    """truncated-BPTT chunk length in steps (default: the preset's)"""
    val_fraction: float = WarmStartConfig.validation_fraction
    """fraction of whole trajectories held out for validation"""
    seed: int = 0
    """seed of the initial weights, the split and the shuffles"""
    scenario: str | None = None
    """scenario of the env (only without stats.json; default a100x4_conv_70)"""
    replicas: int | None = None
    """override the scenario's number of replicas (only without stats.json)"""
    qps: float | None = None
    """override the scenario's arrival rate, requests/s (only without stats.json)"""
    expert: str | None = None
    """router whose tie sets score tie-aware accuracy (default: the single policy in stats.json)"""
    gamma: float = PPOConfig.gamma
    """discount of the value-pretraining returns (use PPO's gamma)"""
    value_pretraining: bool = True
    """also fit the value head on discounted demo returns"""
    norm_reward: bool = True
    """normalise rewards like VecNormalize(norm_reward=True) for value pretraining"""
    eval_episodes: int = 0
    """after training, run the clone (and the expert) on this many held-out episodes"""
    tensorboard: str | None = None
    """directory for TensorBoard + CSV logs of the per-epoch metrics"""
    progress: bool = True
    """show a tqdm bar and one line per epoch"""

    def bc_config(self) -> BCConfig:
        """The preset's BC hyperparameters with the flags' overrides (validated)."""
        overrides = {"epochs": self.epochs, "batch_size": self.batch_size,
                     "learning_rate": self.lr, "sequence_length": self.sequence_length}
        return dataclasses.replace(PRESETS[self.mode].bc,
                                   **{k: v for k, v in overrides.items() if v is not None})

    def ppo_config(self) -> PPOConfig:
        """The architecture the clone is for (the preset's), its discount and reward scaling."""
        return PRESETS[self.mode].ppo(
            algorithm="recurrent_ppo" if self.policy_type == "lstm" else "ppo",
            gamma=self.gamma, norm_reward=self.norm_reward)

    def env_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"scenario": self.scenario or DEFAULT_SCENARIO}
        if self.replicas is not None:
            kwargs["num_replicas"] = self.replicas
        if self.qps is not None:
            kwargs["workload"] = {"qps": self.qps}
        return kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Behaviour-clone demonstrations into a RecurrentPPO/PPO policy and save an "
                    "SB3-loadable checkpoint with metadata.")
    p.add_argument("--demo", required=True, help="demonstration directory")
    p.add_argument("--output", required=True, help="checkpoint path (.zip)")
    p.add_argument("--mode", default=Args.mode, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--policy-type", default=Args.policy_type, help="lstm or mlp")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: preset)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per gradient step (default: preset)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: preset)")
    p.add_argument("--sequence-length", type=int, default=None,
                   help="truncated-BPTT chunk length, steps (default: preset)")
    p.add_argument("--val-fraction", type=float, default=Args.val_fraction,
                   help="fraction of trajectories held out (default %(default)s)")
    p.add_argument("--seed", type=int, default=Args.seed, help="seed, >= 0 (default %(default)s)")
    p.add_argument("--scenario", default=None,
                   help=f"scenario without stats.json (default {DEFAULT_SCENARIO}; known: "
                        f"{', '.join(available_scenarios())}; or a .yaml path)")
    p.add_argument("--replicas", type=int, default=None, help="override num_replicas")
    p.add_argument("--qps", type=float, default=None, help="override the arrival rate (req/s)")
    p.add_argument("--expert", default=None,
                   help="router for tie-aware accuracy (default: from stats.json)")
    p.add_argument("--gamma", type=float, default=Args.gamma,
                   help="discount of value-pretraining returns (default %(default)s)")
    p.add_argument("--no-value-pretraining", action="store_true",
                   help="do not fit the value head")
    p.add_argument("--no-norm-reward", action="store_true",
                   help="fit the value head on raw (unnormalised) rewards")
    p.add_argument("--eval-episodes", type=int, default=Args.eval_episodes,
                   help="held-out episodes to run the clone on after training (default 0)")
    p.add_argument("--tensorboard", default=None, help="TensorBoard/CSV log directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _single_policy(stats: dict[str, Any] | None) -> str | None:
    weights = (stats or {}).get("weights") or (stats or {}).get("policies") or {}
    return next(iter(weights)) if isinstance(weights, dict) and len(weights) == 1 else None


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """Parse and validate ``argv``; exits with status 2 naming the flag on a bad value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    demo = Path(ns.demo)
    if not demo.is_dir():
        parser.error(f"--demo={ns.demo!r}: not a directory (expected imitation's "
                     "serialize.save output)")
    checks = (
        ("--mode", ns.mode, ns.mode in PRESETS, f"unknown preset (known: {', '.join(PRESETS)})"),
        ("--policy-type", ns.policy_type, ns.policy_type in ("lstm", "mlp"),
         "must be lstm or mlp"),
        ("--val-fraction", ns.val_fraction, 0.0 <= ns.val_fraction < 1.0, "must be in [0, 1)"),
        ("--seed", ns.seed, ns.seed >= 0, "must be >= 0"),
        ("--replicas", ns.replicas, ns.replicas is None or ns.replicas >= 1, "must be >= 1"),
        ("--qps", ns.qps, ns.qps is None or (math.isfinite(ns.qps) and ns.qps > 0),
         "must be a rate > 0 requests/s"),
        ("--gamma", ns.gamma, 0.0 <= ns.gamma <= 1.0, "must be in [0, 1]"),
        ("--eval-episodes", ns.eval_episodes, ns.eval_episodes >= 0, "must be >= 0"),
    )
    for flag, value, ok, message in checks:
        if not ok:
            parser.error(f"{flag}={value!r}: {message}")
    try:
        stats = read_stats(demo)
    except ValueError as err:
        parser.error(f"--demo={ns.demo!r}: {err}")
    if stats is not None:
        for flag, value in (("--scenario", ns.scenario), ("--replicas", ns.replicas),
                            ("--qps", ns.qps)):
            if value is not None:
                parser.error(f"{flag}={value!r}: the demos' stats.json fixes the env "
                             "(env_kwargs); drop the flag")
        if not isinstance(stats.get("env_kwargs"), dict):
            parser.error(f"--demo={ns.demo!r}: stats.json has no env_kwargs object")
    elif ns.scenario is not None and ns.scenario not in available_scenarios() and not (
            Path(ns.scenario).suffix in (".yaml", ".yml") and Path(ns.scenario).is_file()):
        parser.error(f"--scenario={ns.scenario!r}: unknown scenario (known: "
                     f"{', '.join(available_scenarios())}; or an existing .yaml path)")
    expert = ns.expert if ns.expert is not None else _single_policy(stats)
    if ns.expert is not None:
        if ns.expert not in ROUTERS:
            parser.error(f"--expert={ns.expert!r}: unknown router (known: {', '.join(ROUTERS)})")
    output = Path(ns.output)
    if output.is_dir():
        parser.error(f"--output={ns.output!r}: is a directory (give a file path)")
    if output.parent.exists() and not output.parent.is_dir():
        parser.error(f"--output={ns.output!r}: parent is not a directory")
    args = Args(demo=ns.demo, output=ns.output, mode=ns.mode, policy_type=ns.policy_type,
                epochs=ns.epochs, batch_size=ns.batch_size, lr=ns.lr,
                sequence_length=ns.sequence_length, val_fraction=ns.val_fraction, seed=ns.seed,
                scenario=ns.scenario, replicas=ns.replicas, qps=ns.qps, expert=expert,
                gamma=ns.gamma, value_pretraining=not ns.no_value_pretraining,
                norm_reward=not ns.no_norm_reward, eval_episodes=ns.eval_episodes,
                tensorboard=ns.tensorboard, progress=not ns.no_progress)
    try:  # BC hyperparameters and architecture are validated by their configs, once
        args.bc_config()
        args.ppo_config()
    except ConfigError as err:
        field, _, rest = str(err).partition("=")
        parser.error(f"{BC_FLAGS.get(field, '--' + field.replace('_', '-'))}={rest}")
    return args


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`run` produced."""

    path: Path
    summary: dict[str, Any]


def _fail(message: str) -> None:
    print(f"pretrain.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(args: Args, command: Sequence[str]) -> PretrainResult:
    """Load the demos, clone them, save the checkpoint; returns its path and a summary."""
    import gymnasium as gym
    import torch
    from imitation.data import serialize

    import llm_cluster_env
    from sb3_warmstart.policies.io import save_pretrained

    torch.set_num_threads(1)
    started = time.perf_counter()
    demo = Path(args.demo)
    stats = read_stats(demo)
    try:
        trajectories = list(serialize.load(demo))
    except Exception as err:  # datasets raises many types for a broken directory
        _fail(f"--demo={args.demo!r}: cannot load the demonstrations: {err}")
    if not trajectories:
        _fail(f"--demo={args.demo!r}: holds no trajectories")

    env_kwargs = dict(stats["env_kwargs"]) if stats is not None else args.env_kwargs()
    try:
        env = gym.make(llm_cluster_env.ENV_ID, **env_kwargs)
    except (llm_cluster_env.ConfigError, ValueError, TypeError) as err:
        _fail(f"env_kwargs {env_kwargs}: {err}")
    layout = env.unwrapped.layout
    schema = layout.schema()
    if stats is not None and stats.get("schema") not in (None, schema):
        stored = stats["schema"]
        diffs = [k for k in sorted(set(stored) | set(schema)) if stored.get(k) != schema.get(k)]
        _fail(f"--demo={args.demo!r}: stats.json schema differs from the env built from its "
              f"env_kwargs in {diffs}")
    width = int(np.shape(trajectories[0].obs)[-1])
    if width != layout.size:
        _fail(f"--demo={args.demo!r}: observations have {width} features, the env "
              f"({env_kwargs}) has {layout.size}; pass the env the demos came from")

    from sb3_warmstart.warmstart.cloning import clone_demonstrations

    logger = None
    if args.tensorboard:
        from stable_baselines3.common.logger import configure

        logger = configure(args.tensorboard, ["tensorboard", "csv"])
    print(f"BC: {len(trajectories)} trajectories, {sum(len(t.acts) for t in trajectories)} "
          f"steps, preset {args.mode}, policy {args.policy_type}")
    clone = clone_demonstrations(
        trajectories, env=env, bc=args.bc_config(), ppo=args.ppo_config(), seed=args.seed,
        validation_fraction=args.val_fraction, value_pretraining=args.value_pretraining,
        expert=args.expert, logger=logger, progress=args.progress)
    model, obs_rms, returns, summary = (clone.model, clone.obs_rms, clone.return_normalizer,
                                        clone.summary)
    if args.eval_episodes:
        summary["eval"] = evaluate_clone(model, obs_rms, env.unwrapped, args.expert,
                                         args.eval_episodes, args.seed)
    metadata = clone.metadata(
        demos={"path": str(demo.resolve()), "trajectories": len(trajectories),
               "steps": int(sum(len(t.acts) for t in trajectories)), "expert": args.expert,
               "stats": {k: stats.get(k) for k in ("format", "seed", "weights",
                                                   "episode_requests", "total_steps")}
               if stats is not None else None},
        env_kwargs=env_kwargs,
        pretrain_args=dataclasses.asdict(args),
        command=list(command),
    )
    path = save_pretrained(args.output, model.policy, metadata, obs_rms,
                           observation_schema=schema, return_normalizer=returns,
                           algorithm_kwargs={"gamma": args.gamma})
    summary["seconds"] = time.perf_counter() - started
    print(format_summary(summary))
    print(f"wrote {path}")
    return PretrainResult(path=path, summary=summary)


def evaluate_clone(model, obs_rms, env, expert: str | None, episodes: int, seed: int
                   ) -> dict[str, Any]:
    """Mean E2E latency of the clone (deterministic) and of the expert on held-out seeds."""
    from llm_cluster_env.tools.evaluation import run_episode
    from sb3_warmstart.policies.router import PolicyRouter

    seeds = [EVAL_SEED_BASE + 1000 * seed + i for i in range(episodes)]
    clone = PolicyRouter(model, obs_rms, name="clone")
    out: dict[str, Any] = {"seeds": seeds,
                           "clone_e2e_mean": float(np.mean([run_episode(env, clone, s)[0]
                                                            ["e2e_mean"] for s in seeds]))}
    if expert is not None:
        router = make_router(expert)
        out["expert_e2e_mean"] = float(np.mean([run_episode(env, router, s)[0]["e2e_mean"]
                                                for s in seeds]))
        out["ratio"] = out["clone_e2e_mean"] / out["expert_e2e_mean"]
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"BC summary after {s['epochs']} epochs ({s['bc_seconds']:.1f} s):",
             f"  train accuracy       {s['train_accuracy']:.4f}",
             f"  val accuracy         {s['val_accuracy']:.4f}",
             f"  val tie-aware acc.   {s['val_tie_accuracy']:.4f}",
             f"  val NLL              {s['val_nll']:.4f} nats"]
    if s["predicted_share"] is not None:
        lines.append("  action share (val)   replica: " + " ".join(
            f"{i:>6d}" for i in range(len(s["predicted_share"]))))
        lines.append("    predicted                   " + " ".join(
            f"{x:6.3f}" for x in s["predicted_share"]))
        lines.append("    expert                      " + " ".join(
            f"{x:6.3f}" for x in s["expert_share"]))
    if "eval" in s:
        e = s["eval"]
        line = f"  held-out E2E mean    clone {e['clone_e2e_mean']:.3f} s"
        if "expert_e2e_mean" in e:
            line += (f", expert {e['expert_e2e_mean']:.3f} s "
                     f"({100 * (e['ratio'] - 1):+.2f}%)")
        lines.append(line + f" over {len(e['seeds'])} episodes")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0)."""
    args = parse_args(argv)
    command = ["train/pretrain.py", *(sys.argv[1:] if argv is None else argv)]
    run(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
