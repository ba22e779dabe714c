"""Collect heuristic-router demonstrations on ``LLMCluster-v0`` and save them atomically.

Single policy::

    python train/collect_demos.py --policy lor --steps 100000 --output demos/lor

Mixed policies with imbalance segments (alternating high/low arrival rates)::

    python train/collect_demos.py --policies lor:0.6,round_robin:0.3,random:0.1 --imbalance \\
        --steps 200000 --episode-requests 512 --output demos/mixed

All arguments are checked before any rollout; a bad value exits with status 2 and a message
naming the flag and the value. The output directory holds imitation's HuggingFace dataset
(``imitation.data.serialize.load(output)`` reads it) and ``stats.json``, which also records this
command and the resolved arguments (see :mod:`sb3_warmstart.warmstart.demos`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_cluster_env.config import ConfigError
from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.scenarios import available_scenarios
from sb3_warmstart.warmstart.demos import (
    ImbalanceSpec,
    check_output_replaceable,
    collect_demonstrations,
    plan_collection,
    save_demonstrations,
)


@dataclass
class Args:
    """Resolved command-line arguments."""

    output: str
    """output directory (replaced atomically if it holds an earlier demonstration set)"""
    policies: dict[str, float]
    """router name -> weight (``--policy NAME`` gives ``{NAME: 1.0}``)"""
    steps: int = 100_000
    """transitions wanted in total (routed requests), split by weight"""
    scenario: str = "a100x4_conv_70"
    """packaged scenario name or scenario YAML path"""
    replicas: int | None = None
    """override the scenario's number of replicas"""
    qps: float | None = None
    """override the scenario's mean arrival rate (requests/s)"""
    episode_requests: int | None = None
    """requests per episode; default min(scenario's, smallest per-policy step budget)"""
    num_envs: int = 1
    """sub-envs per policy (DummyVecEnv)"""
    seed: int = 0
    """root seed of every env, router and shuffle stream"""
    imbalance: bool = False
    """also collect under alternating high/low arrival-rate phases"""
    imbalance_high: float = 1.4
    """high-phase rate as a multiple of the scenario's rate"""
    imbalance_low: float = 0.5
    """low-phase rate as a multiple of the scenario's rate"""
    imbalance_fraction: float = 0.5
    """share of each policy's transitions collected under imbalance"""
    progress: bool = True
    """show a tqdm progress bar"""

    def env_kwargs(self) -> dict:
        """Keyword arguments of ``gym.make("LLMCluster-v0", ...)``."""
        kwargs: dict = {"scenario": self.scenario}
        if self.replicas is not None:
            kwargs["num_replicas"] = self.replicas
        if self.qps is not None:
            kwargs["workload"] = {"qps": self.qps}
        if self.episode_requests is not None:
            kwargs["episode_requests"] = self.episode_requests
        return kwargs

    def imbalance_spec(self) -> ImbalanceSpec | bool:
        if not self.imbalance:
            return False
        return ImbalanceSpec(high_factor=self.imbalance_high, low_factor=self.imbalance_low,
                             fraction=self.imbalance_fraction)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collect_demos.py",
        description="Collect heuristic-router demonstrations on LLMCluster-v0 (imitation "
                    "trajectories + stats.json), written atomically.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--policy", metavar="NAME",
                      help=f"single-policy mode: one router ({', '.join(ROUTERS)}); "
                           "default lor")
    mode.add_argument("--policies", metavar="NAME:W,...",
                      help="mixed mode: comma-separated router:weight pairs, weights > 0, "
                           "e.g. lor:0.6,round_robin:0.3,random:0.1")
    parser.add_argument("--steps", type=int, default=Args.steps,
                        help="transitions wanted in total, split by weight (default %(default)s)")
    parser.add_argument("--scenario", default=Args.scenario,
                        help="packaged scenario or YAML path (default %(default)s; known: "
                             f"{', '.join(available_scenarios())})")
    parser.add_argument("--replicas", type=int, default=None,
                        help="override the scenario's number of replicas")
    parser.add_argument("--qps", type=float, default=None,
                        help="override the scenario's mean arrival rate (requests/s)")
    parser.add_argument("--episode-requests", type=int, default=None,
                        help="requests per episode (default: min of the scenario's and the "
                             "smallest per-policy step budget)")
    parser.add_argument("--num-envs", type=int, default=Args.num_envs,
                        help="sub-envs per policy (default %(default)s)")
    parser.add_argument("--seed", type=int, default=Args.seed,
                        help="root seed, >= 0 (default %(default)s)")
    parser.add_argument("--imbalance", action="store_true",
                        help="also collect under alternating high/low arrival-rate phases")
    parser.add_argument("--imbalance-high", type=float, default=Args.imbalance_high,
                        help="high-phase rate / scenario rate (default %(default)s)")
    parser.add_argument("--imbalance-low", type=float, default=Args.imbalance_low,
                        help="low-phase rate / scenario rate (default %(default)s)")
    parser.add_argument("--imbalance-fraction", type=float, default=Args.imbalance_fraction,
                        help="share of each policy's steps under imbalance (default %(default)s)")
    parser.add_argument("--output", required=True,
                        help="output directory (an earlier demonstration set there is replaced "
                             "atomically; anything else is refused)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _parse_policies(parser: argparse.ArgumentParser, text: str) -> dict[str, float]:
    policies: dict[str, float] = {}
    for entry in text.split(","):
        name, sep, raw = entry.strip().partition(":")
        if not sep or not name:
            parser.error(f"--policies={text!r}: entry {entry!r} must be NAME:WEIGHT")
        if name not in ROUTERS:
            parser.error(f"--policies={text!r}: unknown router {name!r} "
                         f"(known: {', '.join(ROUTERS)})")
        if name in policies:
            parser.error(f"--policies={text!r}: router {name!r} given twice")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):
            parser.error(f"--policies={text!r}: weight of {name!r} must be a number > 0, "
                         f"got {raw!r}")
        policies[name] = weight
    return policies


_FIELD_FLAGS = (
    ("episode_requests=", "--episode-requests"),
    ("total_steps=", "--steps"),
    ("num_replicas=", "--replicas"),
    ("qps=", "--qps"),
    ("scenario=", "--scenario"),
)


def _flag_of(message: str) -> str:
    """The flag a validation message is about (the settings in general if unclear)."""
    for field, flag in _FIELD_FLAGS:
        if message.startswith(field) or f".{field}" in message or f" {field}" in message:
            return flag
    return "invalid settings"


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """Parse and validate ``argv``; exits with status 2 naming the flag on a bad value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.policies is not None:
        policies = _parse_policies(parser, ns.policies)
    else:
        name = ns.policy or "lor"
        if name not in ROUTERS:
            parser.error(f"--policy={name!r}: unknown router (known: {', '.join(ROUTERS)})")
        policies = {name: 1.0}
    checks = (
        ("--steps", ns.steps, ns.steps >= 1, "must be >= 1 transition"),
        ("--replicas", ns.replicas, ns.replicas is None or ns.replicas >= 1, "must be >= 1"),
        ("--qps", ns.qps, ns.qps is None or (math.isfinite(ns.qps) and ns.qps > 0),
         "must be a rate > 0 requests/s"),
        ("--episode-requests", ns.episode_requests,
         ns.episode_requests is None or ns.episode_requests >= 1, "must be >= 1 request"),
        ("--num-envs", ns.num_envs, ns.num_envs >= 1, "must be >= 1"),
        ("--seed", ns.seed, ns.seed >= 0, "must be >= 0"),
    )
    for flag, value, ok, message in checks:
        if not ok:
            parser.error(f"{flag}={value!r}: {message}")
    scenario_path = Path(ns.scenario)
    if scenario_path.suffix in (".yaml", ".yml"):
        if not scenario_path.is_file():
            parser.error(f"--scenario={ns.scenario!r}: no such file")
    elif ns.scenario not in available_scenarios():
        parser.error(f"--scenario={ns.scenario!r}: unknown scenario "
                     f"(known: {', '.join(available_scenarios())}; or a .yaml path)")
    args = Args(output=ns.output, policies=policies, steps=ns.steps, scenario=ns.scenario,
                replicas=ns.replicas, qps=ns.qps, episode_requests=ns.episode_requests,
                num_envs=ns.num_envs, seed=ns.seed, imbalance=ns.imbalance,
                imbalance_high=ns.imbalance_high, imbalance_low=ns.imbalance_low,
                imbalance_fraction=ns.imbalance_fraction, progress=not ns.no_progress)
    try:
        imbalance = args.imbalance_spec()
    except ValueError as err:  # "imbalance.high_factor=..." -> --imbalance-high
        flag = {"high_factor": "--imbalance-high", "low_factor": "--imbalance-low",
                "fraction": "--imbalance-fraction"}
        names = [f for key, f in flag.items() if f"imbalance.{key}=" in str(err)]
        parser.error(f"{names[0] if names else '--imbalance'}: {err}")
    try:
        plan_collection(env_kwargs=args.env_kwargs(), policies=args.policies,
                        total_steps=args.steps, imbalance=imbalance)
    except (ConfigError, ValueError) as err:
        parser.error(f"{_flag_of(str(err))}: {err}")
    try:
        check_output_replaceable(args.output)
    except FileExistsError as err:
        parser.error(f"--output={args.output!r}: {err}")
    return args


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
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    trajectories, stats = collect_demonstrations(
        env_kwargs=args.env_kwargs(), policies=args.policies, total_steps=args.steps,
        seed=args.seed, num_envs=args.num_envs, imbalance=args.imbalance_spec(),
        progress=args.progress)
    stats["command"] = [sys.argv[0] if argv is None else "train/collect_demos.py",
                        *(sys.argv[1:] if argv is None else argv)]
    stats["cli_args"] = dataclasses.asdict(args)
    path = save_demonstrations(args.output, trajectories, stats)
    print(format_summary(stats))
    print(f"wrote {path}")
    return stats


if __name__ == "__main__":
    main()
