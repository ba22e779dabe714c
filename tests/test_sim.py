"""Simulator core: jump/iteration equivalence, invariants, hand-checked timings, preemption."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_cluster_env.config import ReplicaConfig
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.sim.cluster import Cluster, build_replica
from llm_cluster_env.sim.prefix_cache import HostCache
from llm_cluster_env.sim.replica import Replica
from llm_cluster_env.sim.request import Request, RequestState


class LinearLatency:
    """A simple iteration-time model with the calibrated model's interface (seconds)."""

    def __init__(self, overhead=0.008, per_seq=5e-5, per_ctx=2e-7, per_prefill=6e-5):
        self.decode_time_per_context_token = per_ctx
        self._table = [0.0] + [overhead + per_seq * b for b in range(1, 4097)]
        self.overhead, self.per_seq, self.per_prefill = overhead, per_seq, per_prefill

    def decode_base_time(self, batch_size):
        return self._table[batch_size]

    def decode_segment(self, batch_size, context_tokens):
        return self.decode_base_time(batch_size), self.decode_time_per_context_token, None

    def iteration_time(self, decode_batch, decode_context_tokens, prefill_chunks=()):
        if not prefill_chunks:
            return (self.decode_base_time(decode_batch)
                    + self.decode_time_per_context_token * decode_context_tokens)
        t = self.overhead + self.per_seq * decode_batch
        t += self.decode_time_per_context_token * decode_context_tokens
        for chunk, prior in prefill_chunks:
            t += self.per_prefill * chunk + 1e-9 * chunk * (prior + chunk / 2)
        return t


def make_cluster(n=4, jump=True, blocks=4000, check=True, latency=None, host_blocks=0,
                 **replica_kwargs):
    replica_kwargs.setdefault("batching", "mixed")
    config = ReplicaConfig(**replica_kwargs)
    replicas = [Replica(i, config, latency or LinearLatency(), blocks, 4096, jump=jump,
                        host_cache=HostCache(host_blocks, 2e-5) if host_blocks else None)
                for i in range(n)]
    return Cluster(replicas, check_invariants=check)


def random_requests(seed, n=600, qps=25.0, max_prompt=2000, max_output=400, ties=False,
                    prefix=False):
    """Random requests; with ``prefix``, prompts share prefixes: one of five system prompts,
    then a conversation (30 sessions) whose turns grow by the previous turn's output."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / qps, n))
    if ties:  # several requests at exactly the same instant, as in real traces
        times = np.round(times, 1)
    prompts = rng.integers(1, max_prompt, n)
    outputs = rng.integers(1, max_output, n)
    if not prefix:
        return [Request(i, float(t), int(p), int(o))
                for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]
    requests, history = [], {}
    system = [16 * int(k) + int(j) for k, j in zip(rng.integers(1, 40, 5), rng.integers(0, 16, 5))]
    for i, (t, o) in enumerate(zip(times, outputs)):
        session = int(rng.integers(30))
        sys_tokens = system[session % 5]
        context = history.get(session, sys_tokens)
        prompt = context + int(rng.integers(1, max_prompt // 4))
        if prompt + o > 3000:  # the conversation starts over
            prompt = sys_tokens + int(rng.integers(1, max_prompt // 4))
        history[session] = prompt + int(o)
        chain = PrefixChain((session % 5, 100 + session), (0, sys_tokens), session)
        requests.append(Request(i, float(t), prompt, int(o), chain))
    return requests


def run_episode(cluster, requests, policy="lor", seed=0):
    rng = np.random.default_rng(seed)
    cluster.reset(requests)
    last_now = -math.inf
    while (req := cluster.next_arrival()) is not None:
        assert cluster.now >= last_now  # simulated time never goes backwards
        last_now = cluster.now
        if policy == "lor":
            loads = [len(r.waiting) + len(r.running) for r in cluster.replicas]
            choice = loads.index(min(loads))
        else:
            choice = int(rng.integers(len(cluster.replicas)))
        cluster.dispatch(req, choice)
    cluster.drain()
    return requests


def timestamps(requests):
    return np.array([[r.first_scheduled_time, r.first_token_time, r.finish_time,
                      r.num_preemptions, r.replica_id] for r in requests])


EQUIVALENCE_CASES = {
    "plain": dict(),
    "tight_kv_preemption": dict(blocks=500),
    "very_tight_kv": dict(blocks=200, qps=40.0),
    "chunked_prefill": dict(batching="mixed_chunked"),
    "chunked_tight_kv": dict(batching="mixed_chunked", blocks=400),
    "small_batch_cap": dict(max_batch_size=8),
    "simultaneous_arrivals": dict(ties=True),
    "random_routing": dict(policy="random"),
    "vllm_v0": dict(batching="vllm_v0"),
    "vllm_v0_tight_kv": dict(batching="vllm_v0", blocks=500),
    "vllm_v0_very_tight_kv": dict(batching="vllm_v0", blocks=200, qps=40.0),
    "vllm_v0_small_batch_cap": dict(batching="vllm_v0", max_batch_size=8),
    "vllm_v0_simultaneous_arrivals": dict(batching="vllm_v0", ties=True),
    "prefix_cache": dict(prefix_caching=True, prefix=True),
    "prefix_cache_chunked": dict(prefix_caching=True, prefix=True, batching="mixed_chunked"),
    "prefix_cache_tight_kv": dict(prefix_caching=True, prefix=True, blocks=400),
    "prefix_cache_chunked_tight_kv": dict(prefix_caching=True, prefix=True, blocks=300,
                                          batching="mixed_chunked"),
    "prefix_cache_host_tier": dict(prefix_caching=True, prefix=True, blocks=400,
                                   host_blocks=300),
    "prefix_cache_simultaneous_random": dict(prefix_caching=True, prefix=True, ties=True,
                                             policy="random", blocks=500),
}


@pytest.mark.parametrize("case", sorted(EQUIVALENCE_CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jump_mode_matches_iteration_mode(case, seed):
    kw = dict(EQUIVALENCE_CASES[case])
    blocks = kw.pop("blocks", 4000)
    qps = kw.pop("qps", 25.0)
    ties = kw.pop("ties", False)
    policy = kw.pop("policy", "lor")
    prefix = kw.pop("prefix", False)
    results = []
    for jump in (True, False):
        cluster = make_cluster(jump=jump, blocks=blocks, **kw)
        reqs = run_episode(cluster, random_requests(seed, n=300 if prefix else 600, qps=qps,
                                                    ties=ties, prefix=prefix), policy, seed)
        results.append((timestamps(reqs), cluster))
    (a, jump_cluster), (b, iter_cluster) = results
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    # the jump really skipped work: fewer events than iterations simulated one by one
    assert jump_cluster.num_events < iter_cluster.num_events
    assert (sum(r.num_iterations for r in jump_cluster.replicas)
            == sum(r.num_iterations for r in iter_cluster.replicas))
    if "tight" in case:
        assert a[:, 3].sum() > 0, "this case is meant to exercise preemption"
    if prefix:  # the cache did its work, identically in both modes
        caches = [[r.cache for r in c.replicas] for c in (jump_cluster, iter_cluster)]
        assert sum(r.hit_blocks for r in jump_cluster.replicas) > 0
        for a_cache, b_cache in zip(*caches):
            assert a_cache.lengths == b_cache.lengths
            assert a_cache.blocks_evicted == b_cache.blocks_evicted
        if kw.get("host_blocks"):
            assert sum(r.host_hit_blocks for r in jump_cluster.replicas) > 0


def test_jump_mode_matches_iteration_mode_on_calibrated_model():
    config = ReplicaConfig()
    results = []
    for jump in (True, False):
        cluster = Cluster([build_replica(i, config, jump) for i in range(4)], check_invariants=True)
        results.append(timestamps(run_episode(cluster, random_requests(7, n=800, qps=12.0))))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("jump", [True, False])
def test_every_request_finishes_once_and_area_is_sum_of_latencies(jump):
    cluster = make_cluster(jump=jump, blocks=300)
    requests = random_requests(3, n=500, qps=30.0)
    cluster.reset(requests)
    while (req := cluster.next_arrival()) is not None:
        cluster.dispatch(req, req.id % 4)
    cluster.drain()
    finished_ids = [r.id for r in cluster.finished]
    assert sorted(finished_ids) == list(range(len(requests)))  # each exactly once
    assert all(r.state == RequestState.FINISHED for r in requests)
    for r in requests:
        assert r.arrival_time <= r.first_scheduled_time <= r.first_token_time <= r.finish_time
    e2e = sum(r.finish_time - r.arrival_time for r in requests)
    assert cluster.area == pytest.approx(e2e, rel=1e-9)
    tokens = sum(rep.tokens_generated for rep in cluster.replicas)
    assert tokens >= sum(r.output_tokens for r in requests)  # recompute may redo none of them


def test_single_request_timing_by_hand():
    lat = LinearLatency()
    cluster = make_cluster(n=1, latency=lat)
    req = Request(0, 1.0, prompt_tokens=100, output_tokens=5)
    run_episode(cluster, [req])
    prefill = lat.iteration_time(0, 0, [(100, 0)])
    # decode iterations: context grows from 101 to 104 tokens (prompt + generated so far)
    decodes = sum(lat.iteration_time(1, 100 + g) for g in range(1, 5))
    assert req.first_scheduled_time == 1.0
    assert req.first_token_time == pytest.approx(1.0 + prefill, abs=1e-12)
    assert req.finish_time == pytest.approx(1.0 + prefill + decodes, abs=1e-12)
    assert cluster.replicas[0].num_iterations == 5


def test_one_token_output_finishes_in_its_prefill_iteration():
    lat = LinearLatency()
    cluster = make_cluster(n=1, latency=lat)
    req = Request(0, 0.0, prompt_tokens=64, output_tokens=1)
    run_episode(cluster, [req])
    assert req.finish_time == req.first_token_time == pytest.approx(
        lat.iteration_time(0, 0, [(64, 0)]))


def test_request_arriving_at_a_batch_boundary_joins_the_next_iteration():
    lat = LinearLatency()
    cluster = make_cluster(n=1, latency=lat)
    first = Request(0, 0.0, 50, 1)
    boundary = lat.iteration_time(0, 0, [(50, 0)])
    second = Request(1, boundary, 70, 1)  # arrives exactly when the first iteration ends
    run_episode(cluster, [first, second])
    assert second.first_scheduled_time == boundary
    assert second.finish_time == pytest.approx(boundary + lat.iteration_time(0, 0, [(70, 0)]))


def test_preemption_evicts_most_recent_and_recomputes():
    # 3 requests whose prompts fit but whose decode growth cannot: 20 blocks of 16 tokens
    cluster = make_cluster(n=1, blocks=20, watermark=0.0)
    reqs = [Request(i, 0.001 * i, prompt_tokens=90, output_tokens=60) for i in range(3)]
    run_episode(cluster, reqs)
    assert reqs[0].num_preemptions == 0  # the oldest is never the victim
    assert reqs[2].num_preemptions >= 1  # the most recently admitted is
    assert all(r.state == RequestState.FINISHED for r in reqs)
    # recompute keeps the first-token time of the first admission
    assert reqs[2].first_token_time < reqs[2].finish_time
    rep = cluster.replicas[0]
    assert rep.num_preemptions == sum(r.num_preemptions for r in reqs)


def test_fcfs_admission_and_batch_cap():
    cluster = make_cluster(n=1, max_batch_size=3)
    reqs = [Request(i, 0.0001 * i, 32, 40) for i in range(10)]
    cluster.reset(reqs)
    peak = 0
    while (req := cluster.next_arrival()) is not None:
        cluster.dispatch(req, 0)
        peak = max(peak, len(cluster.replicas[0].running))
    cluster.drain()
    assert peak <= 3
    starts = [r.first_scheduled_time for r in reqs]
    assert starts == sorted(starts)


def test_watermark_blocks_admission():
    # 100 blocks, watermark 10%: a 95-block prompt can never be admitted beside anything, and
    # the workload cap (max_request_tokens) reports it.
    cluster = make_cluster(n=1, blocks=100, watermark=0.1)
    assert cluster.replicas[0].max_request_tokens == 90 * 16


def test_chunked_prefill_spreads_a_long_prompt_over_iterations():
    lat = LinearLatency()
    cluster = make_cluster(n=1, latency=lat, batching="mixed_chunked", max_num_batched_tokens=256)
    req = Request(0, 0.0, prompt_tokens=1000, output_tokens=2)
    run_episode(cluster, [req])
    chunks = [(256, 0), (256, 256), (256, 512), (232, 768)]
    expected_ttft = sum(lat.iteration_time(0, 0, [c]) for c in chunks)
    assert req.first_token_time == pytest.approx(expected_ttft, abs=1e-12)
    assert cluster.replicas[0].num_iterations == 5


def test_cluster_is_reusable_and_deterministic():
    cluster = make_cluster()
    a = timestamps(run_episode(cluster, random_requests(11)))
    b = timestamps(run_episode(cluster, random_requests(11)))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jump", [True, False])
def test_block_boundaries_exact_multiples_under_tight_memory(jump):
    """Prompts that fill whole blocks grow into a new block on their first decode step; the
    closed-form block count must agree with the per-request count throughout (checked on every
    event by check_invariants) and match iteration mode."""
    reqs = [Request(i, 0.01 * i, prompt_tokens=16 * (1 + i % 3), output_tokens=40 + 7 * i)
            for i in range(12)]
    cluster = make_cluster(n=1, blocks=24, watermark=0.0, jump=jump)
    run_episode(cluster, reqs)
    assert all(r.state == RequestState.FINISHED for r in reqs)
    assert sum(r.num_preemptions for r in reqs) > 0
    rep = cluster.replicas[0]
    assert rep.num_decoding == 0 and rep.prefill_blocks == 0 and rep.decode_blocks(rep.clock) == 0


def test_block_boundary_modes_agree():
    def run(jump):
        reqs = [Request(i, 0.01 * i, 16 * (1 + i % 3), 40 + 7 * i) for i in range(12)]
        run_episode(make_cluster(n=1, blocks=24, watermark=0.0, jump=jump), reqs)
        return timestamps(reqs)

    np.testing.assert_allclose(run(True), run(False), rtol=0, atol=1e-9)


@pytest.mark.parametrize("batching", ["mixed", "mixed_chunked"])
@pytest.mark.parametrize("blocks", [4000, 300])
def test_prefix_caching_without_shared_prefixes_changes_only_recomputes(batching, blocks):
    """Prompts that share nothing: caching on gives exactly the timestamps of caching off
    until a preemption; then the recompute finds the victim's own blocks cached (vLLM keeps a
    preempted request's blocks too), so only preempted requests, and those behind them, gain."""
    results, clusters = [], []
    for caching in (False, True):
        reqs = random_requests(5, n=400, qps=30.0)
        if caching:
            for r in reqs:
                r.chain = PrefixChain((-(r.id + 1),), (0,))
        cluster = make_cluster(blocks=blocks, batching=batching, prefix_caching=caching)
        results.append(timestamps(run_episode(cluster, reqs)))
        clusters.append(cluster)
    off, on = results
    preempted = np.flatnonzero(off[:, 3] > 0)
    if not len(preempted):
        np.testing.assert_array_equal(off, on)
        return
    first = min(off[preempted[0], 0], on[np.flatnonzero(on[:, 3] > 0)[0], 0])
    before = off[:, 2] < first  # finished before the first preempted request was admitted
    np.testing.assert_array_equal(off[before], on[before])
    saved = sum(r.prefill_tokens_saved for r in clusters[1].replicas)
    assert saved > 0 and sum(r.hit_blocks for r in clusters[1].replicas) == 0  # recomputes only


@pytest.mark.parametrize("seed", range(4))
def test_prefix_cache_fuzz_keeps_its_invariants(seed):
    """Random shared prefixes, tight memory, a host tier, random routing: every event keeps the
    cache consistent (check_invariants: no block over capacity counting evictable ones,
    reference counts match the requests' references, holders positive, cached sets
    prefix-closed) and every request finishes exactly once."""
    rng = np.random.default_rng(seed)
    blocks = int(rng.integers(200, 600))
    cluster = make_cluster(n=3, blocks=blocks, batching=["mixed", "mixed_chunked"][seed % 2],
                           prefix_caching=True, host_blocks=int(rng.integers(0, 2)) * 200,
                           max_batch_size=int(rng.integers(4, 64)), watermark=0.0)
    reqs = random_requests(100 + seed, n=500, qps=float(rng.uniform(10, 60)), prefix=True,
                           ties=bool(seed % 2))
    run_episode(cluster, reqs, policy="random", seed=seed)
    assert sorted(r.id for r in cluster.finished) == list(range(len(reqs)))
    for rep in cluster.replicas:
        assert rep.cache.held_refs == rep.cache.held_distinct == 0
        assert not rep.cache.holders
        assert rep.cache.evictable.count + rep.blocks_in_use(rep.clock - 1) <= rep.num_blocks
