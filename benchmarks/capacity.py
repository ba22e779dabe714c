"""Saturation throughput of one replica per hardware/model pair (requests/s).

Defines "load" in the scenario files: a scenario at 70% load sends 0.7 x the sum of its
replicas' saturation throughput. Saturation = a queue that never empties (arrivals far faster
than service), conversation-trace lengths; throughput is measured over the middle 60% of
completions to exclude ramp-up and drain. Each batching policy has its own capacity: the
packaged scenarios use the default, ``mixed_chunked``.

Usage: ``python benchmarks/capacity.py [--requests 6000] [--batching mixed_chunked mixed vllm_v0]``
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import time_episode
from llm_cluster_env.env.cluster_env import LLMClusterEnv

PAIRS = (("llama-2-7b", "a100", 1), ("llama-2-7b", "h100", 1), ("llama-2-7b", "a40", 1),
         ("llama-2-7b", "a100", 2), ("llama-3-8b", "a100", 1), ("llama-2-70b", "a100", 4),
         ("llama-2-70b", "h100", 4))


BATCHING = ("mixed_chunked", "mixed", "vllm_v0")


def saturation_throughput(model: str, gpu: str, tp: int, requests: int,
                          batching: str = "mixed_chunked") -> tuple[float, float]:
    env = LLMClusterEnv(num_replicas=1, episode_requests=requests,
                        replica={"model": model, "gpu": gpu, "tensor_parallel": tp,
                                 "batching": batching},
                        workload={"qps": 1000.0, "empirical": "splitwise_conv"})
    time_episode(env, "round_robin")
    finish = np.sort([r.finish_time for r in env.cluster.requests])
    lo, hi = int(0.2 * len(finish)), int(0.8 * len(finish))
    return (hi - lo) / (finish[hi] - finish[lo]), env.episode_metrics()["preemptions_total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--batching", nargs="+", choices=BATCHING, default=list(BATCHING))
    args = parser.parse_args()
    print(f"{'batching':>13} {'model':>12} {'gpu':>5} {'tp':>3}  {'req/s at saturation':>20}"
          f"  {'preemptions':>11}")
    for batching in args.batching:
        for model, gpu, tp in PAIRS:
            rps, preempt = saturation_throughput(model, gpu, tp, args.requests, batching)
            print(f"{batching:>13} {model:>12} {gpu:>5} {tp:>3}  {rps:>20.2f}  {preempt:>11.0f}")


if __name__ == "__main__":
    main()
