"""Per-request TTFT lower bounds (llm_cluster_env.tools.ttft_bounds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.sim.request import Request
from llm_cluster_env.tools.evaluation import run_episode
from llm_cluster_env.tools.ttft_bounds import (
    cacheable_prefix_tokens,
    lone_prefill_time,
    ttft_bounds,
)
from llm_cluster_env.workload import Workload

#: The trace beside the checkout (``../shared/data``); the tests that need it skip without it.
MOONCAKE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake"
               / "conversation_trace.jsonl")


def one_replica(batching: str) -> LLMClusterEnv:
    return LLMClusterEnv(num_replicas=1, episode_requests=2,
                         replica={"model": "llama-3-8b", "gpu": "a100", "prefix_caching": True,
                                  "batching": batching})


def serve(env: LLMClusterEnv, work: Workload):
    env.reset(seed=0, options={"workload": work})
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(0)
    return info["requests"]


@pytest.mark.parametrize("batching", ["mixed_chunked", "mixed"])
def test_lone_request_ttft_equals_the_bound_with_nothing_cached(batching):
    env = one_replica(batching)
    prompt = 5000  # three chunks of the 2,048-token budget under mixed_chunked
    work = Workload([1.5], [prompt], [4], chains=[PrefixChain((7, 8), (0, prompt))])
    records = serve(env, work)
    replica = env.cluster.replicas[0]
    expected = lone_prefill_time(replica, prompt)
    assert records["ttft_s"][0] == pytest.approx(expected, abs=1e-9)
    assert records["cached_prompt_tokens"][0] == 0
    bounds = ttft_bounds(env.cluster.requests, env.config.replica_configs)
    assert bounds.cacheable_tokens.tolist() == [0]
    assert bounds.cached[0] == bounds.uncached[0] == expected
    if batching == "mixed_chunked":  # the chunks are costed one after the other
        latency = replica.latency
        by_hand = (latency.iteration_time(0, 0, [(2048, 0)])
                   + latency.iteration_time(0, 0, [(2048, 2048)])
                   + latency.iteration_time(0, 0, [(904, 4096)]))
        assert expected == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("batching", ["mixed_chunked", "mixed"])
@pytest.mark.parametrize("shared", [8000, 3000])
def test_lone_request_ttft_equals_the_bound_with_its_prefix_cached(batching, shared):
    """A first request warms the cache (same prompt, or the same first ``shared`` tokens) and
    finishes; the second, alone on the idle replica, takes exactly the cached bound."""
    env = one_replica(batching)
    prompt = 8000
    chains = [PrefixChain((7, 100), (0, shared)) if shared < prompt else
              PrefixChain((7, 100), (0, prompt)),
              PrefixChain((7, 101), (0, shared)) if shared < prompt else
              PrefixChain((7, 101), (0, prompt))]
    work = Workload([0.0, 200.0], [prompt, prompt], [3, 3], chains=chains)
    records = serve(env, work)
    assert records["e2e_s"][0] < 200.0  # the replica is idle when the second arrives
    bs = env.config.replica.block_size
    hit = (min(shared, prompt - 1) // bs) * bs
    assert records["cached_prompt_tokens"].tolist() == [0, hit]
    replica = env.cluster.replicas[0]
    warm = lone_prefill_time(replica, prompt, hit)
    assert records["ttft_s"][1] == pytest.approx(warm, abs=1e-9)
    assert warm < lone_prefill_time(replica, prompt)
    bounds = ttft_bounds(env.cluster.requests, env.config.replica_configs)
    assert bounds.cacheable_tokens.tolist() == [0, hit]
    assert bounds.cached[1] == warm
    assert bounds.uncached[1] == pytest.approx(records["ttft_s"][0], abs=1e-9)


def test_cacheable_prefix_counts_earlier_prompts_and_outputs_in_whole_blocks():
    bs = 16
    requests = [
        Request(0, 0.0, 100, 5, PrefixChain((1, 2), (0, 64))),  # KV of 104 tokens: 6 blocks
        Request(1, 1.0, 200, 5, PrefixChain((1, 3), (0, 64))),  # shares segment 1 (4 blocks)
        Request(2, 2.0, 200, 5, PrefixChain((1, 2), (0, 64))),  # + request 0's 2 blocks of seg 2
        Request(3, 3.0, 200, 5, None),  # no chain: nothing shared
        Request(4, 4.0, 40, 5, PrefixChain((1,), (0,))),  # capped at (40 - 1) // 16 = 2 blocks
        Request(5, 5.0, 64, 5, PrefixChain((9,), (0,))),  # first of its content
    ]
    assert cacheable_prefix_tokens(requests, bs).tolist() == [0, 64, 96, 0, 32, 0]
    with pytest.raises(ValueError, match=r"block_size=0"):
        cacheable_prefix_tokens(requests, 0)


def test_lone_prefill_time_refuses_a_cache_covering_the_whole_prompt():
    env = one_replica("mixed_chunked")
    replica = env.cluster.replicas[0]
    with pytest.raises(ValueError, match=r"cached_tokens=100: must be in \[0, prompt_tokens=100\)"):
        lone_prefill_time(replica, 100, 100)
    with pytest.raises(ValueError, match=r"prompt_tokens=0"):
        lone_prefill_time(replica, 0)


def check_floor(env: LLMClusterEnv, routers: list[str], seed: int) -> None:
    """Every request's TTFT is at least its cached bound, and its hit at most its cacheable
    prefix, whatever the router."""
    for name in routers:
        _, latencies = run_episode(env, make_router(name), seed)
        bounds = ttft_bounds(env.cluster.requests, env.config.replica_configs)
        assert np.all(bounds.cached <= bounds.uncached)
        idx = np.searchsorted(bounds.request_id, latencies.request_id)
        assert np.all(latencies.ttft >= bounds.cached[idx] - 1e-9), name
        assert np.all(latencies.cached_tokens <= bounds.cacheable_tokens[idx]), name
        assert latencies.cached_tokens.sum() > 0  # the case exercises cache hits


def test_no_router_beats_the_bound_with_shared_system_prompts():
    env = LLMClusterEnv(scenario="shared_system_prompt", episode_requests=150)
    check_floor(env, ["round_robin", "sglang_cache_aware", "least_tokens"], seed=4)


def test_no_router_beats_the_bound_on_the_mooncake_trace():
    if not Path(MOONCAKE).is_file():
        pytest.skip(f"{MOONCAKE} not present (the Mooncake conversation trace)")
    env = LLMClusterEnv(scenario="mooncake_conv", episode_requests=150,
                        workload={"trace_path": MOONCAKE, "trace_rows": [8400, 12031]})
    check_floor(env, ["round_robin", "dynamo_kv", "session_affinity"], seed=1000)


@pytest.mark.parametrize("argv, message", [
    (["--trace-rows", "8400", "13000"], "--trace-rows=8400 13000: must satisfy 0 <= START < END <= 12031"),
    (["--window-requests", "5000"], "--window-requests=5000: must be in [1, 3631]"),
])
def test_headline_refuses_windows_outside_the_trace_before_running(argv, message):
    import subprocess
    import sys
    if not Path(MOONCAKE).is_file():
        pytest.skip(f"{MOONCAKE} not present (the Mooncake conversation trace)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.prefix_routing", "--headline",
                           "--no-compare", *argv], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert message in done.stderr
    assert "headline:" not in done.stdout  # refused before anything ran


def test_bound_is_the_fastest_replica_type_in_a_heterogeneous_cluster():
    env = LLMClusterEnv(episode_requests=2, replicas=[
        {"model": "llama-2-7b", "gpu": "a100", "prefix_caching": True},
        {"model": "llama-2-7b", "gpu": "h100", "prefix_caching": True}])
    prompt = 3000
    chains = [PrefixChain((7, 100), (0, prompt)), PrefixChain((7, 101), (0, prompt))]
    work = Workload([0.0, 200.0], [prompt, prompt], [3, 3], chains=chains)
    env.reset(seed=0, options={"workload": work})
    a100, h100 = env.cluster.replicas
    bounds = ttft_bounds(env.cluster.requests, env.config.replica_configs)
    cold = [lone_prefill_time(r, prompt) for r in (a100, h100)]
    warm = [lone_prefill_time(r, prompt, 2992) for r in (a100, h100)]
    assert cold[1] < cold[0] and warm[1] < warm[0]  # the H100 is faster
    assert bounds.uncached.tolist() == [cold[1], cold[1]]
    assert bounds.cached.tolist() == [cold[1], warm[1]]
    assert bounds.cacheable_tokens.tolist() == [0, 2992]
