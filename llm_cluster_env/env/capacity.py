"""Measured saturation throughput: what "load" means.

A scenario at load ``x`` sends ``x`` times the sum of its replicas' saturation throughput.
Saturation throughput (requests/s) is measured, not modelled: one replica receives a queue that
never empties (every request arrives at t = 0, lengths drawn from the workload), and the
throughput is the completion rate over the middle 60% of completions (excluding ramp-up and
drain). ``benchmarks/capacity.py`` reports it for the packaged hardware with more requests.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_env.config import ReplicaConfig, WorkloadConfig
from llm_cluster_env.sim.cluster import Cluster
from llm_cluster_env.sim.request import Request
from llm_cluster_env.workload import WorkloadGenerator

#: Requests simulated per measurement: within ~5% of a 6,000-request measurement.
DEFAULT_REQUESTS = 1500


def saturation_throughput(replica: ReplicaConfig, workload: WorkloadConfig,
                          requests: int = DEFAULT_REQUESTS, seed: int = 0,
                          shared_cache: dict | None = None) -> float:
    """Requests/s one ``replica`` completes with a never-empty queue of ``workload``'s lengths
    (its arrival process is ignored); deterministic for a given ``seed``."""
    if requests < 10:
        raise ValueError(f"requests={requests}: needs at least 10 requests to measure a rate")
    cluster = Cluster.from_configs([replica], latency_cache=shared_cache)
    max_total = workload.max_total_tokens or cluster.max_request_tokens
    lengths = WorkloadGenerator(workload, max_total, shared_cache)
    drawn = lengths.sample(requests, np.random.default_rng(seed))
    batch = [Request(i, 0.0, int(p), int(o))
             for i, (p, o) in enumerate(zip(drawn.prompt_tokens, drawn.output_tokens))]
    cluster.reset(batch)
    while (request := cluster.next_arrival()) is not None:
        cluster.dispatch(request, 0)
    cluster.drain()
    finish = np.sort([r.finish_time for r in batch])
    lo, hi = int(0.2 * len(finish)), int(0.8 * len(finish))
    return (hi - lo) / (finish[hi] - finish[lo])


__all__ = ["DEFAULT_REQUESTS", "saturation_throughput"]
