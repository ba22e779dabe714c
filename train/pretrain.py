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

The flags are overrides of the main job's typed
:class:`~sb3_warmstart.pipeline.config.TrainingConfig` (``bc``, ``ppo``, ``env_kwargs``,
``seed``, ``warm_start.validation_fraction``/``value_pretraining``), built and validated once;
its defaults are the dataclasses' and the environment is its resolved ``env``.

``--mode`` picks a preset (:data:`sb3_warmstart.warmstart.bc.PRESETS`: architecture and BC
hyperparameters); ``--epochs/--batch-size/--lr/--sequence-length`` override it. Observations are
normalised with statistics fitted on all demonstrations, exactly as ``VecNormalize`` will
normalise them during PPO; with ``--norm-reward`` (default) the value head is fitted on
discounted returns of VecNormalize-normalised rewards. The checkpoint
(:mod:`sb3_warmstart.policies.policy_file`) embeds those statistics, the schema, the BC
metrics, the demo provenance, the resolved arguments and this command.

All arguments are checked before any work; a bad value exits with status 2 and a message naming
the setting and the value.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.validation import ConfigError, to_dict
from sb3_warmstart.pipeline.config import TrainingConfig, WarmStartConfig, load_config
from sb3_warmstart.warmstart.bc import PRESETS
from sb3_warmstart.warmstart.demo_store import read_stats

#: ``--policy-type`` -> ``ppo.algorithm``.
POLICY_TYPES = {"lstm": "recurrent_ppo", "mlp": "ppo"}
EVAL_SEED_BASE = 1_000_000  # held-out episode seeds start here (demos use other seeds)


@dataclass(frozen=True)
class PretrainJob:
    """What the command line resolved to.

    :param config: the typed config: ``bc`` (the preset's with the flags' overrides), ``ppo``
        (the architecture the clone is for, its ``gamma`` and ``norm_reward``), ``env`` (from
        ``stats.json`` or the flags), ``seed``, ``warm_start.validation_fraction`` and
        ``warm_start.value_pretraining``.
    :param demo: demonstration directory (imitation.data.serialize.save format).
    :param output: checkpoint path (.zip appended if no suffix).
    :param mode: the preset (:data:`sb3_warmstart.warmstart.bc.PRESETS`).
    :param policy_type: ``lstm`` or ``mlp`` (a key of :data:`POLICY_TYPES`).
    :param expert: router whose tie sets score tie-aware accuracy, or ``None``.
    :param eval_episodes: held-out episodes to run the clone (and the expert) on afterwards.
    :param tensorboard: directory for TensorBoard + CSV logs of the per-epoch metrics.
    :param progress: show a progress bar and one line per epoch.
    """

    config: TrainingConfig
    demo: str
    output: str
    mode: str
    policy_type: str
    expert: str | None
    eval_episodes: int
    tensorboard: str | None
    progress: bool

    def record(self) -> dict[str, Any]:
        """The resolved settings, JSON-able (stored as ``pretrain_args``)."""
        c = self.config
        return {"demo": self.demo, "output": self.output, "mode": self.mode,
                "policy_type": self.policy_type, "expert": self.expert,
                "eval_episodes": self.eval_episodes, "tensorboard": self.tensorboard,
                "seed": c.seed, "bc": to_dict(c.bc), "ppo": to_dict(c.ppo),
                "validation_fraction": c.warm_start.validation_fraction,
                "value_pretraining": c.warm_start.value_pretraining,
                "env_kwargs": to_dict(c.env_kwargs)}


def build_parser() -> argparse.ArgumentParser:
    fields = TrainingConfig.__dataclass_fields__
    ws = WarmStartConfig()
    scenario = fields["env_kwargs"].default_factory()["scenario"]
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Behaviour-clone demonstrations into a RecurrentPPO/PPO policy and save an "
                    "SB3-loadable checkpoint with metadata.")
    p.add_argument("--demo", required=True, help="demonstration directory")
    p.add_argument("--output", required=True, help="checkpoint path (.zip)")
    p.add_argument("--mode", default="standard", choices=list(PRESETS),
                   help="preset: architecture + BC hyperparameters (default %(default)s)")
    p.add_argument("--policy-type", default="lstm", choices=list(POLICY_TYPES),
                   help="lstm (RecurrentPPO's MlpLstmPolicy) or mlp (PPO's MlpPolicy) "
                        "(default %(default)s)")
    p.add_argument("--epochs", type=int, help="bc.epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int,
                   help="bc.batch_size, sequences per gradient step (default: the preset's)")
    p.add_argument("--lr", type=float, help="bc.learning_rate (default: the preset's)")
    p.add_argument("--sequence-length", type=int,
                   help="bc.sequence_length, truncated-BPTT chunk length in steps (default: "
                        "the preset's)")
    p.add_argument("--val-fraction", type=float,
                   help="warm_start.validation_fraction: share of whole trajectories held out "
                        f"(default {ws.validation_fraction})")
    p.add_argument("--seed", type=int, help="seed of the initial weights, the split and the "
                                            f"shuffles (default {fields['seed'].default})")
    p.add_argument("--scenario", help="env_kwargs.scenario, only without stats.json "
                                      f"(default {scenario}; or a .yaml path)")
    p.add_argument("--replicas", type=int,
                   help="env_kwargs.num_replicas, only without stats.json")
    p.add_argument("--qps", type=float,
                   help="env_kwargs.workload.qps (requests/s), only without stats.json")
    p.add_argument("--expert", choices=list(ROUTERS), metavar="ROUTER",
                   help="router for tie-aware accuracy (default: the single policy of "
                        "stats.json)")
    p.add_argument("--gamma", type=float,
                   help="ppo.gamma: discount of the value-pretraining returns (default "
                        f"{PRESETS['standard'].ppo().gamma})")
    p.add_argument("--no-value-pretraining", action="store_true",
                   help="warm_start.value_pretraining=false: do not fit the value head")
    p.add_argument("--no-norm-reward", action="store_true",
                   help="ppo.norm_reward=false: fit the value head on raw rewards")
    p.add_argument("--eval-episodes", type=int, default=0,
                   help="held-out episodes to run the clone on after training (default 0)")
    p.add_argument("--tensorboard", default=None, help="TensorBoard/CSV log directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _single_policy(stats: dict[str, Any] | None) -> str | None:
    weights = (stats or {}).get("weights") or (stats or {}).get("policies") or {}
    return next(iter(weights)) if isinstance(weights, dict) and len(weights) == 1 else None


def overrides_from_args(ns: argparse.Namespace, stats: dict[str, Any] | None
                        ) -> dict[str, Any]:
    """The config overrides the flags (and the demos' ``stats.json``) ask for."""
    preset = PRESETS[ns.mode]
    bc = {key: value for key, value in (("epochs", ns.epochs), ("batch_size", ns.batch_size),
                                        ("learning_rate", ns.lr),
                                        ("sequence_length", ns.sequence_length))
          if value is not None}
    ppo: dict[str, Any] = {**preset.architecture, "algorithm": POLICY_TYPES[ns.policy_type]}
    if ns.gamma is not None:
        ppo["gamma"] = ns.gamma
    if ns.no_norm_reward:
        ppo["norm_reward"] = False
    ws: dict[str, Any] = {"value_pretraining": not ns.no_value_pretraining}
    if ns.val_fraction is not None:
        ws["validation_fraction"] = ns.val_fraction
    if stats is not None:
        env = dict(stats["env_kwargs"])
    else:
        env = {key: value for key, value in (("scenario", ns.scenario),
                                             ("num_replicas", ns.replicas))
               if value is not None}
        if ns.qps is not None:
            env["workload"] = {"qps": ns.qps}
    out: dict[str, Any] = {"family": None, "env_kwargs": env, "ppo": ppo,
                           "bc": {**to_dict(preset.bc), **bc}, "warm_start": ws}
    if ns.seed is not None:
        out["seed"] = ns.seed
    return out


def parse_args(argv: Sequence[str] | None = None) -> PretrainJob:
    """Parse ``argv`` into a validated job; exits with status 2 naming the setting on a bad
    value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    demo = Path(ns.demo)
    if not demo.is_dir():
        parser.error(f"--demo={ns.demo!r}: not a directory (expected imitation's "
                     "serialize.save output)")
    if ns.eval_episodes < 0:
        parser.error(f"--eval-episodes={ns.eval_episodes}: must be >= 0")
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
    output = Path(ns.output)
    if output.is_dir():
        parser.error(f"--output={ns.output!r}: is a directory (give a file path)")
    if output.parent.exists() and not output.parent.is_dir():
        parser.error(f"--output={ns.output!r}: parent is not a directory")
    from sb3_warmstart.policies.policy_file import (
        PretrainedCheckpointError,
        _target_path,
        read_metadata,
    )

    target = _target_path(output)
    if target.exists():  # only an earlier clone may be replaced, never another file
        try:
            read_metadata(target)
        except PretrainedCheckpointError as err:
            parser.error(f"--output={ns.output!r}: exists and is not an earlier pretrained "
                         f"checkpoint, refusing to replace it ({err})")
    try:  # everything else is validated by the config, once
        config = load_config(None, overrides=overrides_from_args(ns, stats))
    except ConfigError as err:
        parser.error(str(err))
    return PretrainJob(config=config, demo=ns.demo, output=ns.output, mode=ns.mode,
                       policy_type=ns.policy_type,
                       expert=ns.expert if ns.expert is not None else _single_policy(stats),
                       eval_episodes=ns.eval_episodes, tensorboard=ns.tensorboard,
                       progress=not ns.no_progress)


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`run` produced."""

    path: Path
    summary: dict[str, Any]


def _fail(message: str) -> None:
    print(f"pretrain.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(job: PretrainJob, command: Sequence[str]) -> PretrainResult:
    """Load the demos, clone them, save the checkpoint; returns its path and a summary."""
    import gymnasium as gym
    import torch
    from imitation.data import serialize

    import llm_cluster_env
    from sb3_warmstart.policies.policy_file import save_pretrained

    torch.set_num_threads(1)
    started = time.perf_counter()
    config = job.config
    demo = Path(job.demo)
    stats = read_stats(demo)
    try:
        trajectories = list(serialize.load(demo))
    except Exception as err:  # datasets raises many types for a broken directory
        _fail(f"--demo={job.demo!r}: cannot load the demonstrations: {err}")
    if not trajectories:
        _fail(f"--demo={job.demo!r}: holds no trajectories")

    env = gym.make(llm_cluster_env.ENV_ID, config=config.env)
    layout = env.unwrapped.layout
    schema = layout.schema()
    if stats is not None and stats.get("schema") not in (None, schema):
        stored = stats["schema"]
        diffs = [k for k in sorted(set(stored) | set(schema)) if stored.get(k) != schema.get(k)]
        _fail(f"--demo={job.demo!r}: stats.json schema differs from the env built from its "
              f"env_kwargs in {diffs}")
    width = int(np.shape(trajectories[0].obs)[-1])
    if width != layout.size:
        _fail(f"--demo={job.demo!r}: observations have {width} features, the env "
              f"({config.env_kwargs}) has {layout.size}; pass the env the demos came from")

    from sb3_warmstart.warmstart.cloning import clone_demonstrations

    logger = None
    if job.tensorboard:
        from stable_baselines3.common.logger import configure

        logger = configure(job.tensorboard, ["tensorboard", "csv"])
    print(f"BC: {len(trajectories)} trajectories, {sum(len(t.acts) for t in trajectories)} "
          f"steps, preset {job.mode}, policy {job.policy_type}")
    clone = clone_demonstrations(
        trajectories, env=env, bc=config.bc, ppo=config.ppo, seed=config.seed,
        validation_fraction=config.warm_start.validation_fraction,
        value_pretraining=config.warm_start.value_pretraining, expert=job.expert,
        logger=logger, progress=job.progress)
    model, obs_rms, returns, summary = (clone.model, clone.obs_rms, clone.return_normalizer,
                                        clone.summary)
    if job.eval_episodes:
        summary["eval"] = evaluate_clone(model, obs_rms, env.unwrapped, job.expert,
                                         job.eval_episodes, config.seed)
    metadata = clone.metadata(
        demos={"path": str(demo.resolve()), "trajectories": len(trajectories),
               "steps": int(sum(len(t.acts) for t in trajectories)), "expert": job.expert,
               "stats": {k: stats.get(k) for k in ("format", "seed", "weights",
                                                   "episode_requests", "total_steps")}
               if stats is not None else None},
        env_kwargs=to_dict(config.env),
        pretrain_args=job.record(),
        command=list(command),
    )
    path = save_pretrained(job.output, model.policy, metadata, obs_rms,
                           observation_schema=schema, return_normalizer=returns,
                           algorithm_kwargs={"gamma": config.ppo.gamma})
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
    job = parse_args(argv)
    command = ["train/pretrain.py", *(sys.argv[1:] if argv is None else argv)]
    run(job, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
