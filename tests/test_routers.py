"""Heuristic routers: each rule on hand-made views, ties, determinism, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_env.config import ObservationConfig
from llm_cluster_env.env.observation import ObservationLayout, optional_replica_features
from llm_cluster_env.routing.heuristics import CACHE_AWARE_ROUTERS, ROUTERS, make_router


def view(prompt_k=1.0, **columns):
    """A view of 4 replicas with the given per-replica feature columns (others zero)."""
    config = ObservationConfig()
    layout = ObservationLayout(4, config, optional_replica_features(config, False))
    obs = np.zeros(layout.size, dtype=np.float32)
    block = obs[: layout.replica_block].reshape(4, layout.num_replica_features)
    block[:, layout.column["speed_k"]] = 1.0
    for name, values in columns.items():
        block[:, layout.column[name]] = values
    obs[layout.prompt_index] = prompt_k
    return layout.view(obs)


def router(name, seed=0):
    r = make_router(name)
    r.reset(4, np.random.default_rng(seed))
    return r


def test_lor_picks_fewest_outstanding():
    v = view(queued=[2, 0, 1, 0], running=[3, 4, 1, 3])  # 5, 4, 2, 3
    assert {router("lor", seed).select(v) for seed in range(20)} == {2}
    np.testing.assert_array_equal(router("lor").tied_choices(v), [2])


def test_lor_breaks_ties_at_random_from_its_seed():
    v = view(queued=[2, 0, 1, 0], running=[3, 4, 2, 3])  # 5, 4, 3, 3: replicas 2 and 3 tie
    np.testing.assert_array_equal(router("lor").tied_choices(v), [2, 3])
    idle = view()  # all four tie at 0
    np.testing.assert_array_equal(router("lor").tied_choices(idle), [0, 1, 2, 3])
    first_picks = {router("lor", seed).select(v) for seed in range(40)}
    assert first_picks == {2, 3}  # different seeds pick different tied replicas, never 0 or 1
    r = router("lor", seed=5)
    picks = [r.select(idle) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(picks, minlength=4) / 4000, 0.25, atol=0.03)
    again = router("lor", seed=5)
    assert [again.select(idle) for _ in range(4000)] == picks  # deterministic per seed


def test_lor_waiting_counts_only_queued_and_breaks_ties_low():
    v = view(queued=[1, 0, 0, 2], running=[0, 9, 3, 0])
    assert router("lor_waiting").select(v) == 1  # 0 waiting on 1 and 2: the lowest id
    np.testing.assert_array_equal(router("lor_waiting").tied_choices(v), [1, 2])
    busy = view(queued=[0, 0, 0, 0], running=[30, 0, 2, 5])
    assert {router("lor_waiting", seed).select(busy) for seed in range(10)} == {0}
    assert router("lor", 0).select(busy) == 1  # lor sees the running requests


def test_round_robin_cycles():
    r = router("round_robin")
    assert [r.select(view()) for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    assert r.tied_choices(view()) is None


def test_least_kv_then_outstanding():
    v = view(kv_usage=[0.5, 0.2, 0.2, 0.9], running=[1, 5, 3, 0])
    assert router("least_kv").select(v) == 2


def test_least_tokens_and_least_work_time_use_speed():
    v = view(prefill_tokens_k=[1.0, 0.0, 2.0, 3.0], decode_tokens_k=[1.0, 3.0, 2.0, 0.5],
             speed_k=[1.0, 1.0, 2.0, 2.0])
    assert router("least_tokens").select(v) == 0  # 2, 3, 4, 3.5 k tokens
    # drain time with the 1k-token prompt: 3, 4, 2.5, 2.25 -> replica 3 (fast GPU)
    assert router("least_work_time").select(v) == 3


def test_weighted_lor_prefers_fast_replicas():
    v = view(running=[1, 1, 3, 3], speed_k=[1.0, 1.0, 2.0, 2.5])
    # (n + 1) / speed: 2, 2, 2, 1.6 -> replica 3
    assert router("weighted_lor").select(v) == 3
    v = view(running=[1, 2, 3, 3], speed_k=[1.0, 1.0, 2.0, 2.0])  # 2, 3, 2, 2
    np.testing.assert_array_equal(router("weighted_lor").tied_choices(v), [0, 2, 3])


def test_llm_d_blends_queue_and_kv():
    v = view(running=[10, 0, 5, 5], kv_usage=[0.0, 1.0, 0.4, 0.6])
    # scaled queue 1, 0, .5, .5; scaled kv 0, 1, .4, .6 -> sums 1, 1, .9, 1.1
    assert router("llm_d").select(v) == 2


def test_power_of_two_compares_two_random_replicas():
    v = view(running=[0, 1, 2, 3])
    r = router("power_of_two", seed=3)
    picks = [r.select(v) for _ in range(2000)]
    counts = np.bincount(picks, minlength=4) / 2000
    # replica i wins when sampled with any higher-loaded one: P = (3 - i) / 6
    np.testing.assert_allclose(counts, [3 / 6, 2 / 6, 1 / 6, 0.0], atol=0.03)


def test_least_ttft_scores_estimated_first_token_plus_weighted_added_time_and_kv():
    v = view(est_ttft_s=[2.0, 1.0, 1.5, 3.0], est_delta_s=[1.0, 9.0, 2.0, 0.0])
    plain = make_router("least_ttft", delta_weight=0.0, kv_weight=0.0)
    assert plain.select(v) == 1  # TTFT alone: 2, 1, 1.5, 3
    # + 0.5 x added time: 2.5, 5.5, 2.5, 3 -> the lower index of the tie
    weighted = make_router("least_ttft", delta_weight=0.5, kv_weight=0.0)
    assert weighted.select(v) == 0
    np.testing.assert_allclose(weighted.tied_choices(v), [0, 2])
    np.testing.assert_allclose(weighted.cost(v), [2.5, 5.5, 2.5, 3.0])
    # the defaults: + 0.1 x added time + 4 s per unit of KV-cache usage
    v = view(est_ttft_s=[2.0, 1.0, 1.5, 3.0], est_delta_s=[1.0, 2.0, 2.0, 0.0],
             kv_usage=[0.1, 0.5, 0.2, 0.0])
    np.testing.assert_allclose(router("least_ttft").cost(v), [2.5, 3.2, 2.5, 3.0], rtol=1e-6)
    assert router("least_ttft").select(v) == 0 and plain.select(v) == 1


@pytest.mark.parametrize("key", ["delta_weight", "kv_weight"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1"])
def test_least_ttft_refuses_a_bad_weight(key, bad):
    with pytest.raises(ValueError, match=rf"least_ttft\.{key}="):
        make_router("least_ttft", **{key: bad})


@pytest.mark.parametrize("name", sorted(n for n, cls in ROUTERS.items()
                                         if not cls.requires_context
                                         and n not in CACHE_AWARE_ROUTERS))
def test_deterministic_given_seed(name):  # the cache-aware ones: tests/test_prefix_routers.py
    rng = np.random.default_rng(0)
    views = [view(running=rng.integers(0, 5, 4), kv_usage=rng.random(4)) for _ in range(50)]
    a, b = router(name, seed=7), router(name, seed=7)
    assert [a.select(v) for v in views] == [b.select(v) for v in views]


def test_unknown_router_lists_names():
    with pytest.raises(ValueError, match="router='fastest': unknown router"):
        make_router("fastest")


def test_every_router_declares_features_that_exist():
    """Each router says which per-replica features it reads (the env computes only those);
    every name is a feature of an observation with all optional groups on."""
    from llm_cluster_env.env.cluster_env import LLMClusterEnv

    features = set(LLMClusterEnv(scenario="multiturn_chat", episode_requests=5)
                   .layout.replica_features)
    for name in ROUTERS:
        r = make_router(name)
        assert r.reads is not None, name
        assert set(r.reads) | set(r.reads_if_present) <= features, name
    assert make_router("round_robin").reads == () and make_router("lookahead").reads == ()
    assert make_router("least_added_time").reads == ("est_delta_s",)
