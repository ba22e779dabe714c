"""Collect heuristic-router demonstrations on ``LLMCluster-v0`` and save them atomically.

Single policy::

    python train/collect_demos.py --policy lor --steps 100000 --output demos/lor

Mixed policies with imbalance segments (alternating high/low arrival rates)::

    python train/collect_demos.py --policies lor:0.6,round_robin:0.3,random:0.1 --imbalance \\
        --steps 200000 --episode-requests 512 --output demos/mixed

The flags are the main job's settings (``train/warmstart.py``): they become overrides of the
typed :class:`~sb3_warmstart.pipeline.config.TrainingConfig` (``warm_start.demo_*``, ``seed``,
``env_kwargs``), which is built and validated once, and the environment is its
:attr:`~sb3_warmstart.pipeline.config.TrainingConfig.env` with demonstration-length episodes
(:func:`sb3_warmstart.pipeline.warm_start_stage.demo_env_config`), exactly as the main job
collects. Defaults are the dataclasses' (the ``--imbalance-*`` flags are
:class:`~sb3_warmstart.warmstart.demo_plan.ImbalanceSpec`'s fields). Every argument is checked
before any rollout; a bad value exits with status 2 and a message naming the setting and the
value. The output directory holds imitation's HuggingFace dataset
(``imitation.data.serialize.load(output)`` reads it) and ``stats.json``, which also records this
command and the resolved settings (see :mod:`sb3_warmstart.warmstart.demo_store`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.validation import ConfigError, to_dict
from sb3_warmstart.pipeline.config import TrainingConfig, WarmStartConfig, load_config
from sb3_warmstart.pipeline.warm_start_stage import demo_env_config
from sb3_warmstart.warmstart.demo_collect import collect_demonstrations
from sb3_warmstart.warmstart.demo_plan import ImbalanceSpec, plan_collection
from sb3_warmstart.warmstart.demo_store import check_output_replaceable, save_demonstrations

#: Old flag names kept as aliases of the ImbalanceSpec-generated ones.
IMBALANCE_ALIASES = {"high_factor": "--imbalance-high", "low_factor": "--imbalance-low"}


@dataclass(frozen=True)
class CollectionJob:
    """What the command line resolved to.

    :param config: the typed config (``seed``, ``env_kwargs``/``env``, ``warm_start``).
    :param imbalance: the imbalance segments, or ``None`` without ``--imbalance``.
    :param num_envs: sub-envs per run (DummyVecEnv).
    :param output: output directory.
    :param progress: show progress.
    """

    config: TrainingConfig
    imbalance: ImbalanceSpec | None
    num_envs: int
    output: str
    progress: bool

    def record(self) -> dict[str, Any]:
        """The resolved settings, JSON-able (stored as ``stats["cli_args"]``)."""
        return {"seed": self.config.seed, "env_kwargs": to_dict(self.config.env_kwargs),
                "warm_start": to_dict(self.config.warm_start),
                "imbalance": dataclasses.asdict(self.imbalance) if self.imbalance else None,
                "num_envs": self.num_envs, "output": self.output}


def build_parser() -> argparse.ArgumentParser:
    ws, defaults = WarmStartConfig(), TrainingConfig.__dataclass_fields__
    scenario = defaults["env_kwargs"].default_factory()["scenario"]
    parser = argparse.ArgumentParser(
        prog="collect_demos.py",
        description="Collect heuristic-router demonstrations on LLMCluster-v0 (imitation "
                    "trajectories + stats.json), written atomically.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--policy", metavar="NAME",
                      help=f"single-policy mode: one router ({', '.join(ROUTERS)}); "
                           f"default {ws.demo_policies} (warm_start.demo_policies)")
    mode.add_argument("--policies", metavar="NAME:W,...",
                      help="mixed mode: comma-separated router:weight pairs, weights > 0, "
                           "e.g. lor:0.6,round_robin:0.3,random:0.1")
    parser.add_argument("--steps", type=int,
                        help="transitions wanted in total, split by weight (warm_start."
                             f"demo_steps, default {ws.demo_steps})")
    parser.add_argument("--episode-requests", type=int,
                        help="requests per episode (warm_start.demo_episode_requests, default "
                             f"{ws.demo_episode_requests})")
    parser.add_argument("--scenario", help="packaged scenario or YAML path (env_kwargs.scenario, "
                                           f"default {scenario})")
    parser.add_argument("--replicas", type=int,
                        help="override the scenario's number of replicas (env_kwargs.num_replicas)")
    parser.add_argument("--qps", type=float, help="override the scenario's mean arrival rate, "
                                                  "requests/s (env_kwargs.workload.qps)")
    parser.add_argument("--seed", type=int, help="root seed of every env, router and shuffle "
                                                 f"stream (default {defaults['seed'].default})")
    parser.add_argument("--imbalance", action="store_true", default=None,
                        help="also collect under alternating high/low arrival-rate phases "
                             f"(warm_start.imbalance, default {ws.imbalance})")
    for field in dataclasses.fields(ImbalanceSpec):
        flags = [f"--imbalance-{field.name.replace('_', '-')}"]
        if field.name in IMBALANCE_ALIASES:
            flags.append(IMBALANCE_ALIASES[field.name])
        parser.add_argument(*flags, dest=f"imbalance_{field.name}", type=float,
                            help=f"ImbalanceSpec.{field.name} (default {field.default})")
    parser.add_argument("--num-envs", type=int, default=1,
                        help="sub-envs per policy (default %(default)s)")
    parser.add_argument("--output", required=True,
                        help="output directory (an earlier demonstration set there is replaced "
                             "atomically; anything else is refused)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _parse_policies(parser: argparse.ArgumentParser, text: str) -> dict[str, float]:
    """``NAME:W,...`` -> ``{NAME: W}``; only the syntax is checked here (names and weights are
    the config's to validate)."""
    policies: dict[str, float] = {}
    for entry in text.split(","):
        name, sep, raw = entry.strip().partition(":")
        if not sep or not name:
            parser.error(f"--policies={text!r}: entry {entry!r} must be NAME:WEIGHT")
        if name in policies:
            parser.error(f"--policies={text!r}: router {name!r} given twice")
        try:
            policies[name] = float(raw)
        except ValueError:
            parser.error(f"--policies={text!r}: weight of {name!r} must be a number, got {raw!r}")
    return policies


def overrides_from_args(ns: argparse.Namespace, parser: argparse.ArgumentParser
                        ) -> dict[str, Any]:
    """The config overrides the flags ask for (one scenario: ``family`` is ``None``)."""
    env: dict[str, Any] = {}
    if ns.scenario is not None:
        env["scenario"] = ns.scenario
    if ns.replicas is not None:
        env["num_replicas"] = ns.replicas
    if ns.qps is not None:
        env["workload"] = {"qps": ns.qps}
    ws: dict[str, Any] = {}
    if ns.imbalance is not None:
        ws["imbalance"] = ns.imbalance
    if ns.policies is not None:
        ws["demo_policies"] = _parse_policies(parser, ns.policies)
    elif ns.policy is not None:
        ws["demo_policies"] = {ns.policy: 1.0}
    if ns.steps is not None:
        ws["demo_steps"] = ns.steps
    if ns.episode_requests is not None:
        ws["demo_episode_requests"] = ns.episode_requests
    out: dict[str, Any] = {"family": None, "env_kwargs": env, "warm_start": ws}
    if ns.seed is not None:
        out["seed"] = ns.seed
    return out


def parse_args(argv: Sequence[str] | None = None) -> CollectionJob:
    """Parse ``argv`` into a validated job; exits with status 2 naming the setting on a bad
    value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.num_envs < 1:
        parser.error(f"--num-envs={ns.num_envs}: must be >= 1")
    try:
        config = load_config(None, overrides=overrides_from_args(ns, parser))
        given = {f.name: getattr(ns, f"imbalance_{f.name}")
                 for f in dataclasses.fields(ImbalanceSpec)}
        if not config.warm_start.imbalance:
            for name, value in given.items():
                if value is not None:
                    parser.error(f"--imbalance-{name.replace('_', '-')}={value}: only used with "
                                 "--imbalance; add it or drop the flag")
        imbalance = (ImbalanceSpec(**{k: v for k, v in given.items() if v is not None})
                     if config.warm_start.imbalance else None)
        ws = config.warm_start
        plan_collection(env_config=demo_env_config(config), policies=ws.demo_policies,
                        total_steps=ws.demo_steps, imbalance=imbalance or False)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    try:
        check_output_replaceable(ns.output)
    except FileExistsError as err:
        parser.error(f"--output={ns.output!r}: {err}")
    return CollectionJob(config=config, imbalance=imbalance, num_envs=ns.num_envs,
                         output=ns.output, progress=not ns.no_progress)


def format_summary(stats: dict) -> str:
    """A plain-text table: per policy (and per run with imbalance) steps, episodes, action
    distribution, balance, mean E2E latency and mean return."""
    headers = ["policy", "segment", "steps", "episodes", "action distribution", "balance",
               "E2E mean s", "return"]
    rows = []
    multi_segment = stats["imbalance"] is not None
    for name, p in stats["policies"].items():
        rows.append([name, "all" if multi_segment else "base", p["steps"], p["episodes"],
                     p["action_distribution"], p["balance"], p["mean_e2e_s"], p["mean_return"]])
        if multi_segment:
            for r in stats["runs"]:
                if r["policy"] == name:
                    rows.append(["", r["segment"], r["steps"], r["episodes"],
                                 r["action_distribution"], r["balance"], r["mean_e2e_s"],
                                 r["mean_return"]])
    text_rows = [[str(a), str(b), str(c), str(d), " ".join(f"{x:.3f}" for x in dist),
                  f"{bal:.3f}", f"{e2e:.3f}", f"{ret:.1f}"]
                 for a, b, c, d, dist, bal, e2e, ret in rows]
    widths = [max(len(r[i]) for r in [headers] + text_rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in text_rows]
    lines.append(f"total: {stats['total_steps']} steps ({stats['total_steps_requested']} "
                 f"requested) in {stats['total_episodes']} episodes of "
                 f"{stats['episode_requests']} requests; "
                 f"{stats['timing']['steps_per_second']:.0f} steps/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the CLI; returns the stats that were saved."""
    job = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ws = job.config.warm_start
    trajectories, stats = collect_demonstrations(
        env_config=demo_env_config(job.config), policies=ws.demo_policies,
        total_steps=ws.demo_steps, seed=job.config.seed, num_envs=job.num_envs,
        imbalance=job.imbalance or False, progress=job.progress)
    stats["command"] = [sys.argv[0] if argv is None else "train/collect_demos.py",
                        *(sys.argv[1:] if argv is None else argv)]
    stats["cli_args"] = job.record()
    path = save_demonstrations(job.output, trajectories, stats)
    print(format_summary(stats))
    print(f"wrote {path}")
    return stats


if __name__ == "__main__":
    main()
