"""Observations of a policy's training environment for checking an export, and the graph
inputs they make."""

from __future__ import annotations

from typing import Any

import numpy as np

from sb3_warmstart.export.graph import GraphSpec


def sample_observations(env_kwargs: dict[str, Any], *, requests: int, seed: int,
                        router: str = "lor") -> tuple[np.ndarray, Any]:
    """``requests`` consecutive observations of the environment ``env_kwargs`` routed by a
    heuristic, and the environment's observation layout."""
    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.routing.heuristics import make_router

    kwargs = dict(env_kwargs)
    kwargs["episode_requests"] = requests + 1
    env = LLMClusterEnv(**kwargs)
    obs, _ = env.reset(seed=seed)
    heuristic = make_router(router)
    heuristic.reset(env.num_replicas, np.random.default_rng(seed))
    rows = [obs]
    for _ in range(requests - 1):
        obs, *_ = env.step(heuristic.select(env.view))
        rows.append(obs)
    return np.asarray(rows, dtype=np.float32), env.layout


def graph_inputs(spec: GraphSpec, observations: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Graph inputs for flat observations: replica rows (present replicas only) and tail for a
    replica-set graph, the observation itself for a flat one."""
    if spec.kind == "flat":
        return {"observation": observations.astype(np.float32)}
    per = layout.num_replica_features
    block = observations[:, : layout.replica_block].reshape(len(observations), layout.num_slots,
                                                            per)
    block = block[:, : layout.num_replicas]
    tail = observations[:, layout.replica_block:layout.history_offset]
    return {"replicas": np.ascontiguousarray(block, dtype=np.float32),
            "request": np.ascontiguousarray(tail, dtype=np.float32)}


__all__ = ["graph_inputs", "sample_observations"]
