"""The look-ahead baseline: copies that drain exactly like the simulator, and its decisions."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.routing.lookahead import (
    LookaheadRouter,
    drain_finish_times,
    replica_copy,
    settle_at_boundary,
)
from llm_cluster_env.tools.evaluation import run_episode


def advance(env, steps, seed=0):
    env.reset(seed=seed)
    router = make_router("lor")
    router.reset(env.num_replicas, np.random.default_rng(seed))
    for _ in range(steps):
        env.step(router.select(env.view))


@pytest.mark.parametrize("batching", ["mixed_chunked", "mixed", "vllm_v0"])
def test_copy_with_true_lengths_drains_exactly_as_the_simulator(batching):
    """Route the last request with the look-ahead's copies in hand: the copy that holds it
    finishes every request at the time the simulator's own drain does."""
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=300,
                        replica={"batching": batching})
    advance(env, 299, seed=4)
    request, now = env.pending_request, env.cluster.now
    choice = 2
    predicted = {}
    for i, replica in enumerate(env.cluster.replicas):
        twin = replica_copy(replica)
        start = settle_at_boundary(twin, now)
        if i == choice:
            twin.enqueue(request.clone())
        finished = [r for r in twin.running.values()] + list(twin.waiting)
        drain_finish_times(twin, start)
        predicted.update({r.id: r.finish_time for r in finished})
    _, _, done, _, info = env.step(choice)
    assert done
    records = info["requests"]
    actual = dict(zip(records["request_id"].tolist(),
                      (records["arrival_s"] + records["e2e_s"]).tolist()))
    assert len(predicted) > 50
    for rid, finish in predicted.items():
        assert finish == pytest.approx(actual[rid], abs=1e-9), rid


def test_snapshot_is_independent_and_equals_a_deep_copy():
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=500)
    advance(env, 400, seed=1)
    replica = env.cluster.replicas[0]
    before = (replica.clock, len(replica.running), replica.pending_prefill_tokens)
    fast, deep = replica_copy(replica), copy.deepcopy(replica)
    now = env.cluster.now
    totals = [drain_finish_times(r, settle_at_boundary(r, now)) for r in (fast, deep)]
    assert totals[0] == totals[1] and not fast.has_work()
    assert (replica.clock, len(replica.running), replica.pending_prefill_tokens) == before
    assert replica.has_work()


def test_lookahead_needs_the_routing_context():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=20)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="needs the routing context"):
        LookaheadRouter().select(env.layout.view(obs))


def test_lookahead_beats_lor_on_heterogeneous_hardware():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=600)
    look = [run_episode(env, LookaheadRouter(), seed)[0]["e2e_mean"] for seed in (0, 1)]
    lor = [run_episode(env, make_router("lor"), seed)[0]["e2e_mean"] for seed in (0, 1)]
    assert np.mean(look) < 0.97 * np.mean(lor)


def test_oracle_costs_are_the_true_added_time_in_system():
    """With true lengths, the cost of the chosen replica is exactly what routing there adds to
    the episode's total time in system (no later arrivals: the last request)."""
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=200)
    advance(env, 199, seed=2)
    costs = LookaheadRouter(oracle=True).costs(env.view)
    totals = []
    for choice in (0, 1):
        twin = copy.deepcopy(env)
        _, _, _, _, info = twin.step(choice)
        totals.append(info["requests"]["e2e_s"].sum())
    assert totals[1] - totals[0] == pytest.approx(costs[1] - costs[0], abs=1e-6)


def test_lookahead_sees_the_pending_prompts_cached_prefix():
    """The what-if request carries the pending prompt's block chain, so the copies' prefix
    caches give it the hits it would get: more than load balancing finds, and lower latency."""
    env = LLMClusterEnv(scenario="multiturn_chat", episode_requests=300)
    lor, _ = run_episode(env, make_router("lor"), 3)
    ahead, _ = run_episode(env, make_router("lookahead"), 3)
    assert ahead["prefix_hit_rate_tokens"] > 2.5 * lor["prefix_hit_rate_tokens"] > 0
    assert ahead["e2e_mean"] < lor["e2e_mean"]
