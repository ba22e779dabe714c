"""Prefix-cache-aware routers on hand-made views, the router-side prefix index, the prefix
observation features, and the prefix scenarios end to end."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_env.config import ObservationConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.observation import REPLICA_FEATURES, ObservationLayout, RoutingContext
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.routing.heuristics import (
    CACHE_AWARE_ROUTERS,
    SessionAffinityRouter,
    make_router,
)
from llm_cluster_env.routing.prefix_index import ApproximatePrefixIndex
from llm_cluster_env.scenarios import available_scenarios, load_scenario_dict
from llm_cluster_env.sim.request import Request
from llm_cluster_env.tools.evaluation import run_episode

PREFIX = ("prefix_hit", "prefix_index_fill", "cache_usage")


def view(prompt_k=1.0, context=None, **columns):
    """A 4-replica view with the prefix features and the given columns (others zero)."""
    layout = ObservationLayout(4, ObservationConfig(), PREFIX)
    obs = np.zeros(layout.size, dtype=np.float32)
    block = obs[: layout.replica_block].reshape(4, layout.num_replica_features)
    block[:, layout.column["speed_k"]] = 1.0
    block[:, layout.column["kv_capacity_k"]] = 16.0
    for name, values in columns.items():
        block[:, layout.column[name]] = values
    obs[layout.prompt_index] = prompt_k
    return layout.view(obs, context)


def router(name, seed=0, **kwargs):
    r = make_router(name, **kwargs)
    r.reset(4, np.random.default_rng(seed))
    return r


# ----------------------------------------------------------------------------- SGLang


def test_sglang_follows_the_best_match_above_the_threshold():
    v = view(running=[5, 9, 1, 1], prefix_hit=[0.1, 0.8, 0.8, 0.2])
    assert router("sglang_cache_aware").select(v) == 2  # 1 and 2 tie on match: less load
    low = view(running=[5, 9, 1, 2], prefix_hit=[0.1, 0.25, 0.2, 0.0],
               prefix_index_fill=[0.4, 0.2, 0.5, 0.2])
    assert router("sglang_cache_aware").select(low) == 3  # smallest tree, then least load


def test_sglang_balances_when_both_imbalance_thresholds_pass():
    hot = view(running=[80, 10, 12, 11], prefix_hit=[0.9, 0, 0, 0])
    assert router("sglang_cache_aware").select(hot) == 1  # 70 > 64 and 80 > 1.5 * 10
    close = view(running=[80, 60, 70, 61], prefix_hit=[0.9, 0, 0, 0])
    assert router("sglang_cache_aware").select(close) == 0  # 80 < 1.5 * 60: still balanced
    small = view(running=[8, 1, 1, 1], prefix_hit=[0.9, 0, 0, 0])
    assert router("sglang_cache_aware", balance_abs_threshold=4).select(small) == 1


# ----------------------------------------------------------------------------- llm-d


def test_llm_d_prefix_weights_queue_kv_and_prefix_scores():
    v = view(queued=[4, 0, 2, 4], kv_usage=[0.5, 0.9, 0.2, 0.1], prefix_hit=[1.0, 0, 0.5, 0])
    # scores: queue (max - q) / (max - min), kv 1 - usage, prefix hit; weights 2, 2, 3
    scores = 2 * np.array([0, 1, 0.5, 0]) + 2 * (1 - np.array([0.5, 0.9, 0.2, 0.1])) \
        + 3 * np.array([1.0, 0, 0.5, 0])
    r = router("llm_d_prefix")
    assert r.select(v) == int(np.argmax(scores)) == 2
    np.testing.assert_allclose(-r.cost(v), scores, rtol=1e-6)
    ties = view(queued=[1, 1, 1, 1])
    assert {router("llm_d_prefix", s).select(ties) for s in range(30)} == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- Dynamo


def test_dynamo_cost_is_weighted_prefill_blocks_plus_decode_blocks():
    v = view(prompt_k=1.6, prefill_tokens_k=[0.0, 3.2, 0.0, 0.0],
             kv_usage=[0.5, 0.0, 0.1, 0.1], prefix_hit=[0.0, 1.0, 0.5, 0.0])
    r = router("dynamo_kv", kv_events=False)
    prefill = (np.array([0, 3200, 0, 0]) + 1600 * (1 - np.array([0, 1, 0.5, 0]))) / 16
    decode = np.array([0.5, 0, 0.1, 0.1]) * 16000 / 16 + 100
    np.testing.assert_allclose(r.cost(v), prefill + decode, rtol=1e-6)
    assert r.select(v) == 2
    assert router("dynamo_kv", kv_events=False, overlap_score_weight=0.0).select(v) == 1


def test_dynamo_temperature_samples_the_normalised_softmax():
    v = view(prompt_k=1.6, kv_usage=[0.0, 0.01, 0.02, 0.04])
    r = router("dynamo_kv", seed=3, kv_events=False, temperature=0.5)
    costs = r.cost(v)
    logits = -(costs / (costs.max() - costs.min())) / 0.5
    p = np.exp(logits - logits.max())
    picks = np.bincount([r.select(v) for _ in range(6000)], minlength=4) / 6000
    np.testing.assert_allclose(picks, p / p.sum(), atol=0.02)
    assert r.tied_choices(v) is None


def test_dynamo_with_kv_events_needs_the_routing_context():
    with pytest.raises(ValueError, match="router 'dynamo_kv' needs the routing context"):
        router("dynamo_kv").select(view())


# ----------------------------------------------------------------------------- sessions


def _session_view(key, share=(0.25, 0.25, 0.25, 0.25)):
    request = Request(0, 0.0, 100, 10, PrefixChain((1,), (0,), key) if key is not None else None)
    return view(context=RoutingContext(request, (), 0.0), dispatch_share=list(share))


def test_session_affinity_keeps_a_session_on_its_replica():
    r = router("session_affinity")
    picks = {r.select(_session_view(k)) for k in (7, 7, 7)}
    assert len(picks) == 1
    spread = np.bincount([r.replica_of(k) for k in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(spread, 0.25, atol=0.06)
    assert r.select(_session_view(None, share=(0.3, 0.1, 0.2, 0.4))) == 1  # no key: least share


def test_session_affinity_moves_about_one_nth_of_sessions_when_a_replica_joins():
    four, five = SessionAffinityRouter(), SessionAffinityRouter()
    four.reset(4)
    five.reset(5)
    moved = [k for k in range(5000) if four.replica_of(k) != five.replica_of(k)]
    assert 0.12 < len(moved) / 5000 < 0.28  # ~1/5
    assert all(five.replica_of(k) == 4 for k in moved)  # only to the new replica


# ----------------------------------------------------------------------------- the index


def test_approximate_index_remembers_routed_prompts_least_recent_first_out():
    index = ApproximatePrefixIndex(capacity_blocks=10)
    a, b = ((1, 2), (0, 4)), ((1, 3), (0, 4))
    index.insert(*a, 8)
    index.insert(*b, 6)  # shares segment 1
    assert index.size == 10 and index.match(*a, 8) == 8 and index.match(*b, 8) == 6
    index.insert((9,), (0,), 3)  # three more: a's tail goes first
    assert index.match(*a, 8) == 5 and index.match(*b, 8) == 6
    index.check_invariants()


# ----------------------------------------------------------------------------- env


def _env(**kwargs):
    kwargs.setdefault("episode_requests", 300)
    return LLMClusterEnv(scenario="shared_system_prompt", **kwargs)


def test_prefix_features_appear_only_with_prefix_caching():
    engine = ("est_wait_s", "est_ttft_s", "est_delta_s")
    assert _env().layout.replica_features == REPLICA_FEATURES + PREFIX + engine
    plain = LLMClusterEnv(scenario="a100x4_conv_70")
    assert plain.layout.replica_features == REPLICA_FEATURES + engine
    off = _env(observation={"prefix_features": False})
    assert off.layout.replica_features == REPLICA_FEATURES + engine
    assert _env().layout.schema()["prefix_oracle"] is False
    assert "prefix_oracle" not in plain.layout.schema()


def test_estimated_prefix_hit_equals_the_truth_while_nothing_is_evicted():
    """At low load on a roomy cache, the router's estimate (system prompt blocks routed) is
    exactly the true cached share for a shared-system-prompt workload."""
    env = _env(workload={"qps": 0.5}, episode_requests=200)
    oracle = _env(workload={"qps": 0.5}, episode_requests=200,
                  observation={"prefix_oracle": True})
    a, _ = env.reset(seed=4)
    b, _ = oracle.reset(seed=4)
    r = make_router("round_robin")
    r.reset(4)
    col = [env.layout.names.index(f"r{i}/prefix_hit") for i in range(4)]
    agree = 0
    for _ in range(199):
        action = r.select(env.view)
        if np.array_equal(a[col], b[col]):
            agree += 1
        a, *_ = env.step(action)
        b, *_ = oracle.step(action)
    assert agree >= 190  # only requests arriving before their prefix was computed differ
    assert sum(rep.cache.blocks_evicted for rep in env.cluster.replicas) == 0


@pytest.mark.parametrize("name", CACHE_AWARE_ROUTERS)
def test_cache_aware_routers_find_more_hits_than_lor_and_are_deterministic(name):
    env = _env(episode_requests=600)
    metrics, _ = run_episode(env, make_router(name), seed=2)
    again, _ = run_episode(env, make_router(name), seed=2)
    assert metrics == again
    base, _ = run_episode(env, make_router("lor"), seed=2)
    assert metrics["prefix_hit_rate_blocks"] > base["prefix_hit_rate_blocks"]
    assert all(metrics[f"prefix_hit_rate_tokens_{i}"] > 0 for i in range(4))


def test_metrics_agree_with_the_request_records():
    env = _env(episode_requests=400)
    metrics, _ = run_episode(env, make_router("sglang_cache_aware"), seed=1)
    records = env.request_records()
    assert metrics["prefix_hit_rate_tokens"] == pytest.approx(
        records["cached_prompt_tokens"].sum() / records["prompt_tokens"].sum())
    for i in range(4):
        mine = records["replica"] == i
        assert metrics[f"prefix_hit_rate_tokens_{i}"] == pytest.approx(
            records["cached_prompt_tokens"][mine].sum() / records["prompt_tokens"][mine].sum())
    assert 0 < metrics["prefill_tokens_saved_fraction"] < 1
    assert metrics["prefill_tokens_saved"] >= records["cached_prompt_tokens"].sum()


def test_existing_scenarios_keep_prefix_caching_off():
    for name in available_scenarios():
        replica = load_scenario_dict(name).get("replica", {})
        expected = name.startswith(("mooncake_conv", "multiturn", "shared_system", "prefix_holdout"))
        assert replica.get("prefix_caching", False) == expected, name


def test_context_needs_are_declared_on_the_class_and_the_instance():
    assert make_router("dynamo_kv").requires_context and \
        type(make_router("dynamo_kv")).requires_context
    assert not make_router("dynamo_kv", kv_events=False).requires_context
    assert make_router("session_affinity").requires_context
    assert not make_router("sglang_cache_aware").requires_context
    assert not make_router("llm_d_prefix").requires_context
