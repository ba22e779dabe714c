"""How far a policy's choices are from its teacher's, in the teacher's own costs.

DAgger's teacher (``lookahead``) prices every replica for the pending request: the added
request-seconds of sending it there, from a simulation of each replica to empty
(:meth:`~llm_cluster_env.routing.lookahead.LookaheadRouter.costs`). A router's **regret** at
a state is the cost of its choice minus the least cost (0 when it agrees with the teacher).
Agreement treats a near-tie and a costly mistake alike; regret does not.

For each policy, the policy routes ``--episodes`` fresh episodes of the training family (the
main job's ``generalist`` by default: seeds ``--first-seed ..``, which neither the
demonstrations, DAgger nor the held-out grid use) with ``--requests`` requests each. On every
state it visits, the teacher's costs are computed, and the regret of the policy's choice and
of each ``--heuristics`` router's choice *on that same state* (paired; observation-only
routers, so their choice is a function of the state). Per router: the share of decisions that
differ from the teacher's, the mean regret (seconds per decision), the regret relative to the
mean least cost, and the policy's regret minus each heuristic's with a 95% bootstrap interval
over episodes (:func:`llm_cluster_env.tools.paired_stats.compare_paired_absolute`).

It measures imitation in the teacher's terms, not the latency a policy achieves: for that, the
held-out grid of ``benchmarks/generalisation.py``.

Run: ``python -m benchmarks.teacher_regret --policy distilled:runs/default
--policy distilled:runs/soft --episodes 8 --out regret.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch as th

from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.routing.lookahead import LookaheadRouter
from llm_cluster_env.routing.registry import make_any_router
from llm_cluster_env.tools.paired_stats import compare_paired_absolute
from sb3_warmstart.pipeline.config import load_config
from sb3_warmstart.pipeline.warm_start_stage import dagger_env_spec
from sb3_warmstart.policies.policy_file import load_pretrained
from sb3_warmstart.policies.router import PolicyRouter
from sb3_warmstart.warmstart.dagger import make_env, start_episode

#: Policy files of a run folder, by the prefix ``--policy`` takes.
KINDS = {"bc": "pretrained/bc_policy.zip", "distilled": "pretrained/distilled_policy.zip"}


@dataclass
class RouterRegret:
    """One router's regret on the states a policy visited, episode by episode."""

    name: str
    regret_s: list[float] = field(default_factory=list)    # mean per decision, per episode
    disagree: list[float] = field(default_factory=list)    # share of decisions, per episode

    def add(self, regrets: np.ndarray) -> None:
        self.regret_s.append(float(regrets.mean()))
        self.disagree.append(float(np.mean(regrets > 0)))


def policy_file(spec: str) -> tuple[str, Path]:
    """``kind:run`` (``bc`` or ``distilled``) or a policy zip, as (label, file)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        path = Path(rest) / KINDS[kind]
        label = f"{kind}:{Path(rest).name}"
    else:
        path, label = Path(spec), Path(spec).stem
    if not path.is_file():
        raise SystemExit(f"--policy={spec!r}: no policy file at {path} (give bc:<run>, "
                         "distilled:<run> or a save_pretrained zip)")
    return label, path


def measure(path: Path, env, heuristics: list[str], seeds: list[int]
            ) -> tuple[list[RouterRegret], list[float]]:
    """The policy's and each heuristic's regret on the policy's states, and the mean least
    cost (seconds) per episode."""
    model, _, obs_rms = load_pretrained(path)
    policy = PolicyRouter(model, obs_rms, deterministic=True, name="policy")
    teacher = LookaheadRouter()
    others = {name: make_any_router(name) for name in heuristics}
    rows = [RouterRegret("policy"), *(RouterRegret(n) for n in heuristics)]
    least = []
    for seed in seeds:
        start_episode(env, teacher, seed)
        policy.reset(env.num_replicas, np.random.default_rng(seed))
        for router in others.values():
            router.reset(env.num_replicas, np.random.default_rng(seed))
        per = {r.name: [] for r in rows}
        best, done = [], False
        while not done:
            view = env.view
            costs = teacher.costs(view)
            low = float(costs.min())
            best.append(low)
            action = int(policy.select(view))
            per["policy"].append(costs[action] - low)
            for name, router in others.items():
                per[name].append(costs[int(router.select(view))] - low)
            _, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        for row in rows:
            row.add(np.asarray(per[row.name]))
        least.append(float(np.mean(best)))
    return rows, least


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", required=True,
                        help="bc:<run>, distilled:<run> or a policy zip (repeatable)")
    parser.add_argument("--profile", default="default",
                        help="profile of configs/warmstart.yaml whose DAgger scenarios to route")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--first-seed", type=int, default=777_000)
    parser.add_argument("--heuristics", default="least_added_time,least_ttft,lor")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("episodes", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    heuristics = [h for h in args.heuristics.split(",") if h]
    th.set_num_threads(1)
    config = load_config(None, profile=args.profile)
    env = make_env(spec=dataclasses.replace(dagger_env_spec(config),
                                            episode_requests=args.requests))
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    result: dict = {"settings": {"argv": argv, "profile": args.profile, "seeds": seeds,
                                 "requests": args.requests}, "policies": {}}
    for spec_text in args.policy:
        label, path = policy_file(spec_text)
        rows, least = measure(path, env, heuristics, seeds)
        mean_least = float(np.mean(least))
        print(f"\n{label} ({args.episodes} episodes x {args.requests} requests; mean least "
              f"cost {mean_least:.3f} s)")
        print(f"  {'router':<18} {'disagree':>8} {'regret s':>9} {'vs least':>9}")
        entry: dict = {"mean_least_cost_s": mean_least, "routers": {}, "policy_minus": {}}
        for row in rows:
            regret = float(np.mean(row.regret_s))
            print(f"  {row.name:<18} {np.mean(row.disagree):>8.3f} {regret:>9.3f} "
                  f"{regret / mean_least:>8.1%}")
            entry["routers"][row.name] = {"disagree": float(np.mean(row.disagree)),
                                          "regret_s": regret,
                                          "per_episode_regret_s": row.regret_s}
        for row in rows[1:]:
            cmp = compare_paired_absolute(rows[0].regret_s, row.regret_s)
            print(f"  policy - {row.name}: {cmp.mean:+.3f} s [{cmp.low:+.3f}, {cmp.high:+.3f}]"
                  f" per decision, {cmp.verdict}")
            entry["policy_minus"][row.name] = {"mean": cmp.mean, "low": cmp.low,
                                               "high": cmp.high, "verdict": cmp.verdict}
        result["policies"][label] = entry
    if args.out is not None:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
