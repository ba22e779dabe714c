"""The ``vllm_v0`` batching policy (vLLM before chunked prefill, as Vidur models it), rule by
rule on hand-built cases, driving one replica iteration by iteration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_sim import LinearLatency, random_requests, run_episode, timestamps

from llm_cluster_env.config import ReplicaConfig
from llm_cluster_env.hardware import GPUS, MODELS, vidur_kv_cache_blocks
from llm_cluster_env.sim.cluster import Cluster, build_replica
from llm_cluster_env.sim.replica import Replica
from llm_cluster_env.sim.request import Request, RequestState


def v0_replica(blocks: int, watermark: float = 0.0, jump: bool = False, **kwargs) -> Replica:
    config = ReplicaConfig(batching="vllm_v0", watermark=watermark, **kwargs)
    return Replica(0, config, LinearLatency(), blocks, 4096, jump=jump)


def enqueue(replica: Replica, *lengths: tuple[int, int], t0: float = 0.0) -> list[Request]:
    """Requests with (prompt, output) lengths, arriving in this order at ``t0``."""
    start = replica.num_dispatched
    requests = [Request(start + i, t0, p, o) for i, (p, o) in enumerate(lengths)]
    for req in requests:
        replica.enqueue(req)
    return requests


class Stepper:
    """Runs one replica batch by batch and records what each batch contained."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.now = 0.0

    def step(self) -> tuple[list[Request], int]:
        """Run the next batch; return (requests prefilled in it, decode batch size)."""
        rep = self.replica
        end = rep.start_batch(self.now)
        assert end is not None, "the replica had nothing to run"
        prefills = [req for req, _ in rep._batch_chunks]
        decodes = rep.num_decoding if rep._batch_decodes else 0
        rep.end_batch(end)
        rep.check_invariants(end)
        self.now = end
        return prefills, decodes


def held_blocks(replica: Replica) -> int:
    """KV blocks allocated between batches (decoding requests hold ``ceil((p + g - 1) / bs)``)."""
    return replica.decode_blocks(replica.clock - 1) + replica.prefill_blocks


# ------------------------------------------------------------------------- prefill admission

def test_watermark_stops_admission_at_the_first_request_that_would_cross_it():
    rep = v0_replica(blocks=100, watermark=0.1)  # watermark int(0.1 * 100) = 10 blocks
    assert rep.watermark_blocks == 10
    # 45 + 45 blocks leave exactly 10 free: admitted; the third would leave -35
    a, b, c, d = enqueue(rep, (45 * 16, 50), (45 * 16 - 5, 50), (16, 50), (16, 50))
    prefills, decodes = Stepper(rep).step()
    assert prefills == [a, b] and decodes == 0
    # FCFS stops at the first failure: c (1 block would leave 9 < 10) and d behind it wait
    assert list(rep.waiting) == [c, d]


def test_default_watermark_is_one_percent_of_blocks():
    rep = v0_replica(blocks=7424, watermark=0.01)
    assert rep.watermark_blocks == 74


def test_padded_token_budget_counts_the_longest_prompt_times_the_batch():
    rep = v0_replica(blocks=10_000)
    assert rep.token_budget == 4096
    # 3 x 1000 = 3000 fits; with the 1500-token prompt, 4 x 1500 = 6000 > 4096 stops
    reqs = enqueue(rep, (1000, 10), (1000, 10), (1000, 10), (1500, 10), (10, 10))
    prefills, _ = Stepper(rep).step()
    assert prefills == reqs[:3]
    # a short prompt behind a long one: 2 x 2000 = 4000 fits, 3 x 2000 = 6000 does not, even
    # though the third prompt is short (padding to the longest)
    rep = v0_replica(blocks=10_000)
    reqs = enqueue(rep, (2000, 10), (100, 10), (100, 10))
    prefills, _ = Stepper(rep).step()
    assert prefills == reqs[:2]


def test_batch_size_cap_counts_requests_holding_kv():
    rep = v0_replica(blocks=10_000, max_batch_size=128)
    reqs = enqueue(rep, *[(8, 100)] * 130)
    stepper = Stepper(rep)
    prefills, _ = stepper.step()
    assert prefills == reqs[:128] and len(rep.waiting) == 2
    # with 128 requests holding KV, nothing more is admitted: decode-only batches follow
    prefills, decodes = stepper.step()
    assert prefills == [] and decodes == 128


def test_budget_below_context_length_is_rejected():
    with pytest.raises(ValueError, match="max_num_batched_tokens=2048"):
        build_replica(0, ReplicaConfig(batching="vllm_v0", max_num_batched_tokens=2048))


# -------------------------------------------------------------- prefill-only / decode-only

def test_prefills_and_decodes_never_share_a_batch():
    rep = v0_replica(blocks=10_000)
    (a,) = enqueue(rep, (100, 20))
    stepper = Stepper(rep)
    assert stepper.step() == ([a], 0)
    assert a.generated == 1 and a.first_token_time == stepper.now
    assert stepper.step() == ([], 1)  # decode-only
    generated_before = rep.generated_tokens_active(rep.clock)
    (b,) = enqueue(rep, (300, 20), t0=stepper.now)
    start = stepper.now
    # the new request is prefilled alone: a does not advance, and the batch takes exactly the
    # prefill time of b's prompt
    assert stepper.step() == ([b], 0)
    assert stepper.now - start == pytest.approx(rep.latency.iteration_time(0, 0, [(300, 0)]))
    assert rep.generated_tokens_active(rep.clock) == generated_before + 1  # b's first token only
    assert stepper.step() == ([], 2)


def test_a_head_that_cannot_be_admitted_leaves_a_decode_only_batch():
    rep = v0_replica(blocks=20)
    (a,) = enqueue(rep, (16 * 10, 30))  # 10 blocks
    stepper = Stepper(rep)
    stepper.step()
    (b,) = enqueue(rep, (16 * 11, 30), t0=stepper.now)  # 11 blocks > 10 free
    assert stepper.step() == ([], 1)
    assert list(rep.waiting) == [b]


# ------------------------------------------------------------------ block growth, preemption

def test_a_new_block_every_block_size_tokens():
    rep = v0_replica(blocks=1000)
    (a,) = enqueue(rep, (10, 60))
    stepper = Stepper(rep)
    stepper.step()  # prefill: ceil(10 / 16) = 1 block, first token generated
    history = [held_blocks(rep)]
    while a.state != RequestState.FINISHED:
        stepper.step()
        if a.state != RequestState.FINISHED:
            history.append(held_blocks(rep))
    # after g generated tokens the request has processed 10 + g - 1 tokens... and holds
    # ceil((10 + g - 1) / 16) blocks: the second block at 17 processed tokens, and so on
    expected = [math.ceil((10 + g - 1) / 16) for g in range(1, 60)]
    assert history == expected
    assert history.index(2) == 7 and history.index(3) == 23


def test_growth_past_capacity_preempts_the_newest_which_recomputes():
    rep = v0_replica(blocks=5)
    assert rep.max_request_tokens == 66
    a, b = enqueue(rep, (16, 50), (16, 50))
    stepper = Stepper(rep)
    stepper.step()  # both prefilled: 2 blocks
    first_token_b = b.first_token_time
    # decode 1: both cross a block boundary (17 tokens): 4 blocks; decodes 2..16 need none
    for _ in range(16):
        assert stepper.step() == ([], 2)
    assert a.num_preemptions == b.num_preemptions == 0
    # decode 17 (33 tokens): a takes the last free block, b finds none and, being the newest,
    # preempts itself; a decodes alone
    assert stepper.step() == ([], 1)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.state == RequestState.WAITING and list(rep.waiting) == [b]
    assert b.generated == 17 and b.prefill_tokens == 16 + 17  # recompute prompt + generated
    assert b.first_token_time == first_token_b  # TTFT keeps the original first token
    # b waits until a's blocks are free, then is prefilled again alone
    while a.state != RequestState.FINISHED:
        prefills, _ = stepper.step()
        assert b not in prefills
    assert stepper.step() == ([b], 0)
    assert b.generated == 18


def test_victims_are_the_newest_and_keep_arrival_order_in_the_queue():
    rep = v0_replica(blocks=3)
    a, b, c = enqueue(rep, (16, 50), (16, 50), (16, 50))  # 1 block each: cache full
    stepper = Stepper(rep)
    stepper.step()
    # a's turn: no free block -> c (newest) is preempted; a takes the freed block for its 17th
    # token; b's turn: none free and no newer victim -> b preempts itself
    assert stepper.step() == ([], 1)
    assert (a.num_preemptions, b.num_preemptions, c.num_preemptions) == (0, 1, 1)
    assert list(rep.waiting) == [b, c]


def test_one_free_block_is_needed_even_without_growth():
    # Vidur / vLLM v0 check one free block per running request before its turn, whether or
    # not it crosses a block boundary: a cache filled exactly preempts at the next decode.
    rep = v0_replica(blocks=4)
    a, b = enqueue(rep, (16, 100), (16, 100))
    stepper = Stepper(rep)
    stepper.step()
    stepper.step()  # decode 1: both grow to 2 blocks -> cache full (4 of 4)
    assert b.num_preemptions == 0
    assert stepper.step() == ([], 1)  # decode 2 needs no new block, yet b is preempted
    assert b.num_preemptions == 1 and a.num_preemptions == 0


# ------------------------------------------------------------------ capacity and wiring

def test_kv_capacity_follows_vidurs_memory_rule():
    model, gpu = MODELS["llama-2-7b"], GPUS["a100"]
    assert vidur_kv_cache_blocks(model, gpu, 1, 16, 0.9) == 29 * 256 == 7424
    replica = build_replica(0, ReplicaConfig(batching="vllm_v0"))
    assert replica.num_blocks == 7424 and replica.watermark_blocks == 74
    assert replica.token_budget == 4096 and replica.max_batch_size == 128
    # no CPU overhead: a batch-1 decode costs exactly its GPU time, below the default replica's
    default = build_replica(0, ReplicaConfig(batching="mixed"))
    gap = default.latency.decode_base_time(1) - replica.latency.decode_base_time(1)
    assert gap == pytest.approx(default.latency.coefficients.cpu_overhead_s
                                + default.latency.coefficients.cpu_overhead_per_request_s)


def test_lone_request_never_livelocks_at_the_length_cap():
    rep = v0_replica(blocks=8)
    cap = rep.max_request_tokens
    assert cap == 7 * 16 + 2
    (a,) = enqueue(rep, (cap - 40, 40))
    stepper = Stepper(rep)
    while a.state != RequestState.FINISHED:
        stepper.step()
    assert a.num_preemptions == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_jump_matches_iteration_on_the_calibrated_model(seed):
    config = ReplicaConfig(batching="vllm_v0", num_kv_blocks=600)
    results = []
    for jump in (True, False):
        cluster = Cluster([build_replica(i, config, jump) for i in range(2)], check_invariants=True)
        reqs = run_episode(cluster, random_requests(seed, n=400, qps=8.0))
        results.append(timestamps(reqs))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-9)
    assert results[0][:, 3].sum() > 0  # preemptions happened


def test_vidur_compatible_scenario_and_config_errors():
    from llm_cluster_env.config import ConfigError
    from llm_cluster_env.env.cluster_env import LLMClusterEnv

    env = LLMClusterEnv(scenario="a100x4_vllm_v0")
    assert all(r.batching == "vllm_v0" and r.num_blocks == 7424 and r.token_budget == 4096
               for r in env.cluster.replicas)
    assert env.workload.max_total_tokens == 4096  # Vidur's max_tokens: the context length
    assert LLMClusterEnv().cluster.replicas[0].batching == "mixed_chunked"  # the default
    with pytest.raises(ConfigError, match=r"replica.batching='v1': expected one of"):
        LLMClusterEnv(replica={"batching": "v1"})
