"""Llama-3.1-8B (128k window): registry entry, shipped coefficients reusing Llama-3-8B's
profiles, and iteration times past the profiled 4,096-token contexts checked against first
principles (KV bytes read per decode step vs HBM bandwidth; attention FLOPs vs peak).
"""

from __future__ import annotations

import json

import pytest

from llm_cluster_env.config import ReplicaConfig
from llm_cluster_env.hardware import GPUS, MODELS, kv_cache_blocks
from llm_cluster_env.sim.cluster import Cluster, build_replica
from llm_cluster_env.sim.latency import COEFFICIENTS_DIR, IterationTimeModel
from llm_cluster_env.sim.request import Request

LONG = "llama-3.1-8b"
LONG_CONTEXTS = (4_096, 10_000, 16_384, 32_768, 65_536, 100_000, 131_072)


@pytest.fixture(scope="module")
def model() -> IterationTimeModel:
    return IterationTimeModel.for_replica(LONG, "a100", 1, overhead_s=0.0)


def test_llama31_has_llama3_shapes_and_a_128k_window():
    long, short = MODELS[LONG], MODELS["llama-3-8b"]
    assert long.max_model_len == 131_072 and short.max_model_len == 8_192
    for field in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "num_params", "dtype_bytes"):
        assert getattr(long, field) == getattr(short, field), field
    # ~450k tokens of KV cache on one A100-80GB (128 KiB per token with 8 GQA KV heads)
    tokens = 16 * kv_cache_blocks(long, GPUS["a100"], 1, 16, 0.9)
    assert long.kv_bytes_per_token(1) == 131_072
    assert 400_000 < tokens < 500_000


@pytest.mark.parametrize("tp", [1, 2])
def test_shipped_for_the_gpus_llama3_was_profiled_on_with_reuse_provenance(tp):
    assert (LONG, "a100", tp) in IterationTimeModel.available()
    doc = json.loads((COEFFICIENTS_DIR / f"{LONG}__a100__tp{tp}.json").read_text())
    assert doc["model"] == LONG and doc["provenance"]["files"][0].endswith("Meta-Llama-3-8B/mlp.csv")
    assert "Llama-3-8B" in doc["provenance"]["profiles_reused"]
    # same profiles, same shapes: every iteration time equals Llama-3-8B's
    long = IterationTimeModel.for_replica(LONG, "a100", tp)
    short = IterationTimeModel.for_replica("llama-3-8b", "a100", tp)
    for args in [(1, 500, ()), (64, 64 * 3000, ()), (0, 0, [(2048, 1000)]), (16, 16 * 900, [(300, 0)])]:
        assert long.iteration_time(*args) == short.iteration_time(*args)


def test_decode_attention_at_long_contexts_is_monotone_and_near_the_hbm_bound(model):
    """Decode attention must read every cached K/V byte once: never faster than
    ``B * L * kv_bytes_per_token / bandwidth``; the extrapolated table stays within 2.5x of
    that (low-occupancy small batches) and approaches it at large batches."""
    spec, gpu = MODELS[LONG], GPUS["a100"]
    for batch in (1, 8, 32, 128):
        times = [model.decode_attention_time(batch, batch * ctx) for ctx in LONG_CONTEXTS]
        assert all(b > a > 0.0 for a, b in zip(times, times[1:])), batch
        for ctx, time in zip(LONG_CONTEXTS, times):
            bound = batch * ctx * spec.kv_bytes_per_token(1) / gpu.memory_bandwidth
            assert bound < time < 2.5 * bound, (batch, ctx, time / bound)
        at_128k = times[-1] / (batch * 131_072 * spec.kv_bytes_per_token(1) / gpu.memory_bandwidth)
        assert at_128k < (1.6 if batch < 32 else 1.25), (batch, at_128k)


def test_prefill_after_a_long_prior_context_is_monotone_and_flop_plausible(model):
    """A chunk of c tokens after p cached tokens: attention FLOPs 4 * q_heads * head_dim * layers
    * (c*p + c*c/2). The time grows with p, is never above peak throughput and stays above
    30% of it."""
    spec, gpu = MODELS[LONG], GPUS["a100"]
    for chunk in (256, 2048):
        times = [model.iteration_time(0, 0, [(chunk, prior)]) for prior in (0, *LONG_CONTEXTS)]
        assert all(b > a > 0.0 for a, b in zip(times, times[1:])), chunk
        for prior in LONG_CONTEXTS[1:]:
            extra = model.iteration_time(0, 0, [(chunk, prior)]) - model.iteration_time(0, 0, [(chunk, 0)])
            flops = 4 * spec.num_q_heads * spec.head_dim * spec.num_layers * chunk * prior
            assert flops / gpu.peak_flops < extra < flops / (0.3 * gpu.peak_flops), (chunk, prior)


def test_chunks_past_the_profiled_size_cost_as_profiled_sub_chunks(model):
    limit = model.coefficients.prefill.max_profiled_chunk_tokens
    assert limit == 4096
    for chunk, prior in [(10_000, 0), (126_000, 0), (5_000, 50_000)]:
        whole = model._prefill_chunk_time(chunk, prior)
        parts, done = 0.0, 0
        while done < chunk:
            part = min(limit, chunk - done)
            parts += model._prefill_chunk_time(part, prior + done)
            done += part
        assert whole == pytest.approx(parts, rel=1e-12)
    sizes = (4_000, 4_095, 4_096, 4_097, 4_200, 8_192, 8_193, 20_000, 126_000)
    times = [model.iteration_time(0, 0, [(c, 0)]) for c in sizes]
    assert all(b > a for a, b in zip(times, times[1:]))
    # one 126k-token prefill costs about as much as the same prompt in 2,048-token chunks
    chunked = sum(model.iteration_time(0, 0, [(min(2048, 126_000 - p), p)]) for p in range(0, 126_000, 2048))
    assert model.iteration_time(0, 0, [(126_000, 0)]) == pytest.approx(chunked, rel=0.02)


def test_a_120k_token_prompt_runs_through_a_long_context_replica():
    config = ReplicaConfig(model=LONG, gpu="a100", tensor_parallel=1, batching="mixed_chunked")
    cluster = Cluster([build_replica(0, config)], check_invariants=True)
    requests = [Request(0, 0.0, 120_000, 20), Request(1, 0.5, 2_000, 50)]
    cluster.reset(requests)
    while (req := cluster.next_arrival()) is not None:
        cluster.dispatch(req, 0)
    cluster.drain()
    long, short = requests
    assert long.num_preemptions == 0 and long.finish_time > long.first_token_time > 0.0
    # 59 chunks of 2,048 tokens: ~35 s of prefill on one A100 (first principles: ~4e15 attention
    # + ~2e15 dense FLOP, 20 s at peak); then 19 decode steps of ~25 ms at a 120k context
    assert 25.0 < long.first_token_time < 60.0, long.first_token_time
    decode_step = (long.finish_time - long.first_token_time) / 19
    assert 0.015 < decode_step < 0.06, decode_step
    # FCFS: the long prompt's chunks fill the 2,048-token budget, so the short one waits for it
    assert short.first_token_time > long.first_token_time - 1.0 and short.finish_time > 0.0
