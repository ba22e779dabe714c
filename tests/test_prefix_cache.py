"""Prefix cache: block runs in LRU order, reference counts, eviction, the host tier, and a
replica's prefix hits checked by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from test_sim import LinearLatency, make_cluster, run_episode

from llm_cluster_env.config import ConfigError, ReplicaConfig
from llm_cluster_env.sim.cluster import build_replica
from llm_cluster_env.sim.prefix_cache import (
    HostCache,
    PrefixCache,
    PrefixChain,
    RunLRU,
    chain_spans,
)
from llm_cluster_env.sim.request import Request

# ----------------------------------------------------------------------------- chains


def test_block_starts_give_straddling_blocks_to_the_later_segment():
    chain = PrefixChain((7, 8, -1), (0, 500, 1030))
    assert chain.block_starts(16) == (0, 31, 64)  # block 31 = tokens 496..511 ends in seg 8
    assert chain.block_starts(512) == (0, 0, 2)  # seg 7 owns no whole 512-token block


def test_chain_spans_skip_segments_without_a_block_of_their_own():
    ids, starts = (1, 2, 3, 4), (0, 4, 4, 10)
    assert list(chain_spans(ids, starts, 0, 12)) == [(1, 0, 4), (3, 0, 6), (4, 0, 2)]
    assert list(chain_spans(ids, starts, 5, 9)) == [(3, 1, 5)]
    assert list(chain_spans(ids, starts, 3, 3)) == []


def test_truncated_chain_keeps_segments_inside_the_cut_prompt():
    chain = PrefixChain((5, 6, 7, -3), (0, 512, 1024, 1300), session_key=9)
    cut = chain.truncated(700, tail_id=-4)
    assert cut.ids == (5, 6, -4) and cut.token_starts == (0, 512, 700)
    assert cut.session_key == 9


def test_chain_rejects_a_first_segment_not_at_zero():
    with pytest.raises(ValueError, match="first at token 0"):
        PrefixChain((1,), (3,))


# ----------------------------------------------------------------------------- RunLRU


def test_run_lru_evicts_oldest_runs_first_from_their_top():
    lru = RunLRU()
    lru.push(1, 0, 4)  # oldest
    lru.push(2, 0, 3)
    lru.push(1, 4, 6)  # newest
    assert lru.evict(2) == [(1, 2, 4)]
    assert lru.evict(3) == [(1, 0, 2), (2, 2, 3)]
    assert lru.count == 4
    lru.check()


def test_run_lru_remove_below_trims_and_split_keeps_the_place_in_line():
    lru = RunLRU()
    lru.push(1, 0, 10)
    lru.push(2, 0, 5)
    assert lru.remove_below(1, 3) == 3
    assert lru.remove(1, 5, 7) == 2  # split: [3,5) and [7,10) keep run 1's age
    lru.check()
    assert lru.covered_from(1, 3, 100) == 5 and lru.covered_from(1, 7, 8) == 8
    assert lru.covered_from(1, 5, 100) == 5  # not held
    assert lru.evict(6) == [(1, 7, 10), (1, 3, 5), (2, 4, 5)]


# ----------------------------------------------------------------------------- PrefixCache

CHAIN = ((10, 20), (0, 8))  # segment 10 = blocks 0..7, segment 20 from block 8


def test_hold_release_and_match_follow_reference_counts():
    cache = PrefixCache(num_blocks=100)
    ids, starts = CHAIN
    cache.hold(ids, starts, 0, 12)  # request A computed 12 blocks
    assert (cache.held_refs, cache.held_distinct, cache.cached_blocks(12)) == (12, 12, 12)
    assert cache.match(ids, starts, 20) == (12, 0)  # all held: taking them costs nothing
    cache.hold(ids, starts, 0, 5)  # request B references 5 of them
    assert (cache.held_refs, cache.held_distinct) == (17, 12)
    cache.release(ids, starts, 12, 12)  # A finishes: blocks 5..11 lose their last holder
    assert cache.evictable.count == 7 and cache.match(ids, starts, 20) == (12, 7)
    cache.check_invariants(used_blocks=5)
    cache.release(ids, starts, 5, 5)
    assert (cache.held_refs, cache.held_distinct, cache.evictable.count) == (0, 0, 12)
    cache.check_invariants(used_blocks=0)


def test_eviction_takes_the_oldest_released_tail_first():
    cache = PrefixCache(num_blocks=20)
    a = ((1, 2), (0, 4))
    b = ((1, 3), (0, 4))
    cache.hold(*a, 0, 10)
    cache.hold(*b, 0, 10)  # b hits segment 1 (blocks 0..3) and computes its own 6
    cache.release(*a, 10, 10)  # a's segment 2 loses its holder; segment 1 is still b's
    assert cache.evictable.count == 6
    cache.sync(used_blocks=18)  # 18 in use + 6 evictable > 20: evict 4
    assert cache.lengths == {1: 4, 2: 2, 3: 6}  # from the top of a's tail
    cache.check_invariants(used_blocks=18)
    cache.release(*b, 10, 10)  # b's tail first, then segment 1: 12 evictable now
    cache.sync(used_blocks=10)  # evict 2
    assert cache.lengths == {1: 4, 3: 6}  # the oldest released (a's rest) went first
    cache.sync(used_blocks=12)  # 2 more
    assert cache.lengths == {1: 4, 3: 4}  # then b's tail, before the shared head


def test_release_registers_the_blocks_computed_since_the_last_hold():
    """release(held, end) = hold(held, end) then release: one pass, same state."""
    one, two = PrefixCache(num_blocks=60), PrefixCache(num_blocks=60)
    other = ((1, 3), (0, 4))
    for cache in (one, two):
        cache.hold(*other, 0, 9)  # another request holds segment 1 and its own 5 blocks
        cache.release(*other, 9, 9)
        cache.hold(*CHAIN, 0, 3)
    one.release(*CHAIN, 3, 14)
    two.hold(*CHAIN, 3, 14)
    two.release(*CHAIN, 14, 14)
    for cache in (one, two):
        cache.check_invariants(used_blocks=0)
    assert one.lengths == two.lengths
    assert (one.held_refs, one.held_distinct) == (two.held_refs, two.held_distinct) == (0, 0)
    assert one.evictable.evict(99) == two.evictable.evict(99)


def test_evictions_wait_until_the_queue_is_read_and_evict_the_same_blocks():
    lazy, eager = PrefixCache(num_blocks=20), PrefixCache(num_blocks=20)
    for cache in (lazy, eager):
        cache.hold(*CHAIN, 0, 12)
        cache.release(*CHAIN, 12, 12)
    lazy.allocate(used_blocks=11)  # 3 due
    eager.sync(used_blocks=11)
    assert lazy.due == 3 and lazy.evictable.count == 12 and eager.evictable.count == 9
    other = ((7,), (0,))
    for cache in (lazy, eager):  # a release appends; then a read applies what was due
        cache.hold(*other, 0, 2)
        cache.release(*other, 2, 2)
        cache.allocate(used_blocks=5)  # fewer in use now: nothing more due
    assert lazy.match(*CHAIN, 12) == eager.match(*CHAIN, 12) == (9, 9)
    assert lazy.lengths == eager.lengths and lazy.blocks_evicted == eager.blocks_evicted == 3


def test_a_block_computed_twice_is_adopted_not_duplicated():
    cache = PrefixCache(num_blocks=50)
    ids, starts = CHAIN
    cache.hold(ids, starts, 0, 6)  # A registers 6 blocks
    cache.hold(ids, starts, 0, 10)  # B computed the same 6 and 4 more
    assert cache.held_refs == 16 and cache.held_distinct == 10  # 6 blocks shared
    assert cache.held_refs - cache.held_distinct == 6  # the replica frees B's 6 copies


def test_host_tier_keeps_evicted_blocks_and_serves_a_continuation():
    host = HostCache(capacity_blocks=5, seconds_per_block=1e-3)
    cache = PrefixCache(num_blocks=10, host=host)
    ids, starts = CHAIN
    cache.hold(ids, starts, 0, 10)
    cache.release(ids, starts, 10, 10)
    cache.sync(used_blocks=4)  # evicts blocks 6..9 to the host
    assert cache.match(ids, starts, 10) == (6, 6)
    assert host.match(ids, starts, 6, 10) == 4
    cache.sync(used_blocks=10)  # evicts the rest; the host keeps the 5 most recent
    assert cache.match(ids, starts, 10) == (0, 0)
    assert host.lru.count == 5 and host.match(ids, starts, 0, 10) == 5
    assert host.blocks_written == 10


def test_cache_deepcopies_into_an_independent_state():
    cache = PrefixCache(num_blocks=30)
    ids, starts = CHAIN
    cache.hold(ids, starts, 0, 12)
    cache.release(ids, starts, 12, 12)
    twin = copy.deepcopy(cache)
    twin.sync(used_blocks=30)
    assert twin.lengths == {} and cache.lengths == {10: 8, 20: 4}


# ----------------------------------------------------------------------------- replica


def _pair(first_prompt, second_prompt, system, output=3, **kwargs):
    """Two requests sharing a ``system``-token prefix, the second arriving long after the
    first finished."""
    a = Request(0, 0.0, first_prompt, output, PrefixChain((1, -1), (0, system)))
    b = Request(1, 50.0, second_prompt, output, PrefixChain((1, -2), (0, system)))
    cluster = make_cluster(n=1, prefix_caching=True, **kwargs)
    run_episode(cluster, [a, b])
    return a, b, cluster.replicas[0]


@pytest.mark.parametrize("batching", ["mixed", "mixed_chunked"])
def test_second_request_prefills_only_after_its_cached_prefix(batching):
    lat = LinearLatency()
    a, b, rep = _pair(1000, 1200, system=1000, batching=batching)
    # the shared 1,000 tokens are 62 whole blocks (block 62 holds tokens 992..1007)
    assert b.cached_tokens == 992 and a.cached_tokens == 0
    assert b.first_token_time - b.arrival_time == pytest.approx(
        lat.iteration_time(0, 0, [(1200 - 992, 992)]), abs=1e-12)
    assert rep.prefill_tokens_saved == 992 and rep.hit_blocks == 62
    assert rep.prompt_blocks == -(-1000 // 16) + -(-1200 // 16)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    a, b, _ = _pair(640, 640, system=640)
    assert b.cached_tokens == 624  # 39 of 40 blocks: at least one token is computed


def test_host_tier_load_adds_its_transfer_time():
    lat = LinearLatency()
    a = Request(0, 0.0, 800, 2, PrefixChain((1, -1), (0, 800)))
    filler = Request(1, 10.0, 900, 2)  # no chain: evicts a's blocks to the host
    b = Request(2, 20.0, 900, 2, PrefixChain((1, -3), (0, 800)))
    cluster = make_cluster(n=1, blocks=70, watermark=0.0, prefix_caching=True, host_blocks=100)
    run_episode(cluster, [a, filler, b])
    rep = cluster.replicas[0]
    assert b.cached_tokens == 800 and b.host_tokens > 0
    loaded = b.host_tokens // 16
    gpu = (b.cached_tokens - b.host_tokens)
    expected = lat.iteration_time(0, 0, [(900 - 800, 800)]) + loaded * 2e-5
    assert b.first_token_time - b.arrival_time == pytest.approx(expected, abs=1e-12)
    assert rep.host_hit_blocks == loaded and gpu + b.host_tokens == 800


def test_preempted_request_recomputes_from_its_cached_blocks():
    reqs = [Request(i, 0.001 * i, 200, 150, PrefixChain((-(i + 1),), (0,))) for i in range(3)]
    cluster = make_cluster(n=1, blocks=40, watermark=0.0, prefix_caching=True)
    run_episode(cluster, reqs)
    victim = next(r for r in reqs if r.num_preemptions)
    rep = cluster.replicas[0]
    assert rep.prefill_tokens_saved > 0 and victim.cached_tokens == 0  # first admission: none


def test_replica_config_refuses_prefix_caching_under_vllm_v0_and_a_lone_host_tier():
    with pytest.raises(ConfigError, match="prefix_caching=True: not available with "
                                          "batching='vllm_v0'"):
        ReplicaConfig(batching="vllm_v0", prefix_caching=True)
    with pytest.raises(ConfigError, match="host_cache=True: the host tier extends"):
        ReplicaConfig(host_cache=True)
    with pytest.raises(ConfigError, match="host_cache_gb=0.0"):
        ReplicaConfig(prefix_caching=True, host_cache=True, host_cache_gb=0.0)


def test_host_tier_size_and_transfer_time_come_from_the_model_and_link():
    config = ReplicaConfig(model="llama-3-8b", prefix_caching=True, host_cache=True,
                           host_cache_gb=64.0, host_pcie_gb_s=32.0)
    block_bytes = 2 * 32 * 8 * 128 * 2 * 16  # K and V, 32 layers, 8 KV heads, 128 dims, fp16
    assert config.kv_bytes_per_block == block_bytes
    assert config.host_cache_blocks == 64 * 10**9 // block_bytes
    assert config.host_seconds_per_block == pytest.approx(block_bytes / 32e9)
    replica = build_replica(0, config)
    assert replica.cache.host.capacity_blocks == config.host_cache_blocks


def test_replica_with_cache_deepcopies_mid_episode():
    reqs = [Request(i, 0.05 * i, 300, 40, PrefixChain((1, -(i + 1)), (0, 256)))
            for i in range(20)]
    cluster = make_cluster(n=1, prefix_caching=True)
    cluster.reset(reqs)
    for _ in range(10):
        cluster.dispatch(cluster.next_arrival(), 0)
    twin = copy.deepcopy(cluster.replicas[0])
    assert twin.cache.lengths == cluster.replicas[0].cache.lengths
    assert twin.cache is not cluster.replicas[0].cache
    assert np.isclose(twin.batch_end, cluster.replicas[0].batch_end)


@pytest.mark.parametrize("seed", range(5))
def test_lazy_evictions_match_eager_ones_on_random_operations(seed):
    """Random requests hold, extend and release chains over shared segments while allocations
    come and go: a cache that evicts at once and one that defers evictions until the queue is
    read end every step in the same state once flushed."""
    rng = np.random.default_rng(seed)
    eager, lazy = PrefixCache(num_blocks=120), PrefixCache(num_blocks=120)
    chains = [((s % 3, 10 + s), (0, int(rng.integers(1, 12)))) for s in range(8)]
    active: dict[int, tuple[int, int]] = {}  # request -> (chain index, blocks referenced)
    for step in range(600):
        used = sum(refs for _, refs in active.values()) // 2 + int(rng.integers(0, 40))
        op = rng.random()
        if op < 0.35 and len(active) < 12:
            c = int(rng.integers(len(chains)))
            hit = eager.match(*chains[c], 30)[0]
            assert lazy.match(*chains[c], 30)[0] == hit
            for cache in (eager, lazy):
                cache.hold(*chains[c], 0, hit)
            active[step] = (c, hit)
        elif op < 0.6 and active:
            key = list(active)[int(rng.integers(len(active)))]
            c, refs = active[key]
            grow = refs + int(rng.integers(1, 6))
            for cache in (eager, lazy):
                cache.hold(*chains[c], refs, grow)
            active[key] = (c, grow)
        elif op < 0.85 and active:
            key = list(active)[int(rng.integers(len(active)))]
            c, refs = active.pop(key)
            end = refs + int(rng.integers(0, 4))
            for cache in (eager, lazy):
                cache.release(*chains[c], refs, end)
        used = min(max(used, eager.held_distinct), 120)
        eager.sync(used)
        lazy.allocate(used)
        if rng.random() < 0.3:
            lazy.flush()
            assert lazy.lengths == eager.lengths
            assert lazy.blocks_evicted == eager.blocks_evicted
            lazy.check_invariants(used)
    lazy.flush()
    assert lazy.lengths == eager.lengths and eager.blocks_evicted > 100
    assert lazy.evictable.evict(10**6) == eager.evictable.evict(10**6)


def test_a_deep_copied_cluster_continues_exactly_like_the_original():
    """Look-ahead routers simulate copies of replica state: a copy taken mid-episode (cache
    with evictable runs and holders, a host tier) must evolve exactly as the original."""
    from test_sim import random_requests, timestamps

    cluster = make_cluster(n=2, blocks=300, prefix_caching=True, host_blocks=200)
    reqs = random_requests(4, n=300, qps=30.0, prefix=True)
    cluster.reset(reqs)
    for _ in range(150):
        req = cluster.next_arrival()
        cluster.dispatch(req, req.id % 2)
    twin = copy.deepcopy(cluster)
    assert twin.replicas[0].cache.evictable.count == cluster.replicas[0].cache.evictable.count
    for c in (cluster, twin):
        while (req := c.next_arrival()) is not None:
            c.dispatch(req, req.id % 2)
        c.drain()
    np.testing.assert_array_equal(timestamps(cluster.requests), timestamps(twin.requests))
    for a, b in zip(cluster.replicas, twin.replicas):
        assert a.cache.lengths == b.cache.lengths and a.hit_blocks == b.hit_blocks > 0
