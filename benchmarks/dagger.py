"""DAgger against its teacher, least_added_time, and plain behaviour cloning, on paired seeds.

Runs :func:`sb3_warmstart.warmstart.dagger.run_dagger` with the given teacher on one scenario
(into ``--out-dir``, so a rerun resumes), then routes ``--seeds`` held-out episodes (seeds
``10000 ..``, never used by a round) with:

* ``dagger``: the last round's policy (greedy);
* ``bc_round0``: round 0's clone (BC on ``episodes_per_round`` teacher episodes);
* ``bc_equal_data``: BC on teacher episodes as many as DAgger labelled in all its rounds (the
  fair plain-BC baseline: same data budget, teacher-visited states only);
* the teacher and ``least_added_time``.

Per router: mean E2E over seeds, the paired relative difference vs the teacher and vs
least_added_time with 95 % bootstrap intervals and their verdicts
(:func:`llm_cluster_env.tools.paired_stats.compare_paired`), and for the policies their
on-policy agreement with the teacher (share of their own decisions equal to the teacher's
label, on the held-out episodes).

Run: ``python benchmarks/dagger.py --teacher least_added_time --scenario a100x4_conv_70
--requests 200 --rounds 3 --episodes-per-round 4 --seeds 10 --out-dir runs/dagger``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch as th

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.registry import make_any_router
from llm_cluster_env.tools.evaluation import run_episode
from llm_cluster_env.tools.paired_stats import compare_paired
from sb3_warmstart.pipeline.config import BCConfig, PPOConfig
from sb3_warmstart.policies.router import PolicyRouter
from sb3_warmstart.warmstart.cloning import clone_demonstrations
from sb3_warmstart.warmstart.dagger import (
    DAggerConfig,
    label_episodes,
    load_round_policy,
    make_teacher,
    policy_agreement,
    run_dagger,
)

HELD_OUT_SEED0 = 10_000


@dataclass
class Args:
    """Settings of the benchmark."""

    teacher: str = "least_added_time"
    """router name that labels (make_any_router)"""
    scenario: str = "a100x4_conv_70"
    """packaged scenario"""
    requests: int = 200
    """requests per episode"""
    rounds: int = 3
    """DAgger rounds after round 0"""
    episodes_per_round: int = 4
    """episodes labelled per round"""
    epochs: int = 20
    """BC epochs per round"""
    batch_size: int = 4
    """BC lanes per step (the feed-forward path takes batch_size * sequence_length samples)"""
    sequence_length: int = 8
    """BC sequence length"""
    beta: float = 0.0
    """probability of executing the teacher's action in round 1"""
    seed: int = 0
    """DAgger and BC seed"""
    seeds: int = 10
    """held-out paired evaluation seeds"""
    out_dir: str = "runs/dagger"
    """DAgger run folder (resumed when it exists with the same settings)"""
    out: str | None = None
    """write the results as JSON here"""


def bc_equal_data(env: LLMClusterEnv, args: Args, bc: BCConfig, ppo: PPOConfig,
                  episodes: int) -> PolicyRouter:
    """Plain BC on ``episodes`` teacher-routed episodes (seeds after DAgger's)."""
    seed0 = args.seed + (args.rounds + 1) * args.episodes_per_round
    data = label_episodes(env, make_teacher(args.teacher), None,
                          list(range(seed0, seed0 + episodes)), beta=1.0, seed=args.seed,
                          round_index=0)
    result = clone_demonstrations(data.trajectories(), env=env, bc=bc, ppo=ppo, seed=args.seed,
                                  validation_fraction=0.0, value_pretraining=False)
    return PolicyRouter(result.model, result.obs_rms, name="bc_equal_data")


def _paired(candidate, baseline) -> dict:
    cmp = compare_paired(candidate, baseline)
    return {"mean": cmp.mean, "low": cmp.low, "high": cmp.high, "verdict": cmp.verdict}


def main(args: Args) -> dict:
    th.set_num_threads(1)
    env_kwargs = {"scenario": args.scenario, "episode_requests": args.requests}
    bc = BCConfig(epochs=args.epochs, batch_size=args.batch_size,
                  sequence_length=args.sequence_length)
    ppo = PPOConfig()
    config = DAggerConfig(teacher=args.teacher, rounds=args.rounds,
                          episodes_per_round=args.episodes_per_round, beta=args.beta,
                          seed=args.seed)
    run_dagger(config, env_kwargs=env_kwargs, bc=bc, ppo=ppo, out=args.out_dir,
               progress=lambda msg: print(msg, flush=True))
    env = LLMClusterEnv(**env_kwargs)
    policies = {
        "dagger": load_round_policy(args.out_dir, args.rounds, name="dagger"),
        "bc_round0": load_round_policy(args.out_dir, 0, name="bc_round0"),
        "bc_equal_data": bc_equal_data(env, args, bc, ppo,
                                       (args.rounds + 1) * args.episodes_per_round),
    }
    routers = {**policies, args.teacher: make_any_router(args.teacher)}
    routers.setdefault("least_added_time", make_any_router("least_added_time"))
    seeds = list(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + args.seeds))
    e2e = {name: [run_episode(env, router, s)[0]["e2e_mean"] for s in seeds]
           for name, router in routers.items()}
    rows = {}
    for name in routers:
        row = {"e2e_mean": float(np.mean(e2e[name])), "e2e": e2e[name]}
        if name != args.teacher:
            row["vs_teacher"] = _paired(e2e[name], e2e[args.teacher])
        if "least_added_time" not in (name, args.teacher):
            row["vs_least_added_time"] = _paired(e2e[name], e2e["least_added_time"])
        if name in policies:
            row["agreement"] = policy_agreement(env, policies[name], make_teacher(args.teacher),
                                                seeds)
        rows[name] = row
    print(table(rows, args.teacher))
    results = {"args": asdict(args), "routers": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _cell(row: dict, key: str) -> str:
    c = row.get(key)
    if c is None:
        return "— | —"
    return f"{c['mean']:+.2%} [{c['low']:+.2%}, {c['high']:+.2%}] | {c['verdict']}"


def table(rows: dict, teacher: str) -> str:
    lines = [f"| router | mean E2E s | vs {teacher} [95% CI] | verdict | "
             "vs least_added_time [95% CI] | verdict | on-policy agreement |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        agree = row.get("agreement")
        lines.append(f"| {name} | {row['e2e_mean']:.4f} | {_cell(row, 'vs_teacher')} | "
                     f"{_cell(row, 'vs_least_added_time')} | "
                     f"{agree['exact']:.3f} |" if agree else
                     f"| {name} | {row['e2e_mean']:.4f} | {_cell(row, 'vs_teacher')} | "
                     f"{_cell(row, 'vs_least_added_time')} | — |")
    return "\n".join(lines)


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(Args()).items():
        parser.add_argument("--" + name.replace("_", "-"),
                            type=type(value) if value is not None else str, default=value)
    return Args(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
