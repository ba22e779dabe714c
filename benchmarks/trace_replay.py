"""Simulated requests per wall-second for a 10,000-request replay of the Azure conversation trace.

Replays ``splitwise_conv.csv`` (arrival times and lengths) through ``LLMCluster-v0`` with the
``lor`` router on 4 A100 replicas, at the trace's own rate and rescaled to ~80% load, in jump and
iteration mode. Needs ``../shared/data/vidur`` (or ``--trace PATH``).

Usage: ``python benchmarks/trace_replay.py [--requests 10000] [--trace PATH]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._common import A100_7B_CAPACITY_RPS, best_of, time_episode
from llm_cluster_env.env.cluster_env import LLMClusterEnv

DEFAULT_TRACE = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vidur"
                 / "processed_traces" / "splitwise_conv.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.trace).is_file():
        raise SystemExit(f"--trace={args.trace!r}: file not found (needs ../shared/data/vidur)")

    print(f"{args.requests:,}-request replay of {Path(args.trace).name}, 4x A100 Llama-2-7B, lor")
    print(f"{'rate':>22}  {'mode':>9}  {'sim req/s':>10}  {'sim s / wall s':>14}  "
          f"{'mean E2E s':>10}")
    for label, qps in (("trace's own (5.5/s)", None),
                       ("80% load (16.1/s)", 0.8 * 4 * A100_7B_CAPACITY_RPS)):
        for mode in ("jump", "iteration"):
            env = LLMClusterEnv(
                num_replicas=4, episode_requests=args.requests, simulation_mode=mode,
                workload={"arrival": "trace", "lengths": "trace", "trace_path": args.trace,
                          "trace_start": 0, "trace_qps": qps})
            seconds = best_of(args.repeats, lambda env=env: time_episode(env, "lor")[0])
            metrics = env.episode_metrics()
            sim_seconds = env.cluster.now
            print(f"{label:>22}  {mode:>9}  {args.requests / seconds:>10,.0f}  "
                  f"{sim_seconds / seconds:>14,.0f}  {metrics['e2e_mean']:>10.3f}")


if __name__ == "__main__":
    main()
