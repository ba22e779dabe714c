"""Small helpers shared by the benchmark scripts (timing, scenario loads)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router

#: Saturation throughput of one Llama-2-7B replica on an A100-80GB with conversation-trace
#: lengths (requests/s) under the default ``mixed_chunked`` batching, as measured by
#: benchmarks/capacity.py (``mixed``: 5.09, ``vllm_v0``: 5.27).
A100_7B_CAPACITY_RPS = 5.15


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    """The smallest of ``repeats`` timings (seconds): the least disturbed by a noisy machine."""
    return min(fn() for _ in range(repeats))


def time_episode(env: LLMClusterEnv, router_name: str = "lor", seed: int = 0) -> tuple[float, int]:
    """Wall seconds and steps for one full episode (including the final drain)."""
    router = make_router(router_name)
    env.reset(seed=seed)
    router.reset(env.num_replicas, np.random.default_rng(seed))
    start = time.perf_counter()
    steps = 0
    done = False
    while not done:
        _, _, done, _, _ = env.step(router.select(env.view))
        steps += 1
    return time.perf_counter() - start, steps
