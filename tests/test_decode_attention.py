"""Decode attention: the monotone (batch size x mean context) table, its extrapolation, the
piecewise-linear segments the simulator's jump mode relies on, and Vidur's context rounding.

Needs only the shipped coefficient files (the fit errors against the raw profile are checked in
``tests/test_latency.py``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_sim import random_requests, run_episode, timestamps

from llm_cluster_env.config import ReplicaConfig
from llm_cluster_env.sim.cluster import Cluster, build_replica
from llm_cluster_env.sim.latency import (
    COEFFICIENTS_DIR,
    VIDUR_DECODE_CONTEXT_GRANULARITY,
    DecodeAttention,
    IterationTimeModel,
    LatencyCoefficients,
)
from llm_cluster_env.sim.replica import Replica

SHIPPED = IterationTimeModel.available()
MS = 1e-3
#: mean contexts (tokens per request) from empty to the 128k window, across every table knot
CONTEXTS = (0, 1, 100, 223, 224, 240, 255, 256, 300, 480, 500, 512, 700, 1024, 2000, 4095, 4096,
            4097, 8192, 16_384, 65_536, 131_072)
BATCHES = (*range(1, 140), 200, 256, 512, 1000, 4096, 4097, 5000, 10_000)


def _ids(combo):
    return f"{combo[0]}-{combo[1]}-tp{combo[2]}"


@pytest.fixture(scope="module")
def models():
    return {combo: IterationTimeModel.for_replica(*combo, overhead_s=0.0) for combo in SHIPPED}


@pytest.mark.parametrize("combo", SHIPPED, ids=_ids)
def test_shipped_table_is_positive_monotone_and_slopes_grow_with_batch(combo, models):
    table = models[combo].coefficients.decode.ms
    assert table[0][0] > 0.0
    for i, row in enumerate(table):
        assert all(b >= a for a, b in zip(row, row[1:])), (combo, "context", i)
        if i:
            assert all(b >= a for a, b in zip(table[i - 1], row)), (combo, "batch", i)
            slopes = [(row[j + 1] - row[j]) - (table[i - 1][j + 1] - table[i - 1][j]) for j in range(len(row) - 1)]
            assert min(slopes) >= -1e-12 * max(row), (combo, "supermodular", i)


@pytest.mark.parametrize("combo", SHIPPED, ids=_ids)
def test_decode_time_is_monotone_in_batch_and_context_past_the_profile(combo, models):
    """Non-decreasing in B at every mean context and in the context at every B, positive and
    finite, up to 10,000 requests and 128k-token contexts (profiled: 128 and 4,096)."""
    model = models[combo]
    grid = [[model.iteration_time(b, b * ctx) for ctx in CONTEXTS] for b in BATCHES]
    for row in grid:
        assert all(math.isfinite(t) and t > 0.0 for t in row)
        assert all(b >= a * (1 - 1e-12) for a, b in zip(row, row[1:])), combo
        assert row[-1] > row[0]
    for j in range(len(CONTEXTS)):
        column = [row[j] for row in grid]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(column, column[1:])), (combo, CONTEXTS[j])
    attention = [model.decode_attention_time(b, b * ctx) for b in (1, 64, 5000) for ctx in CONTEXTS]
    assert min(attention) > 0.0


def test_extrapolation_extends_the_last_segments_linearly(models):
    """Past the last context knot each batch size keeps its 1,024-4,096 slope; past the last
    batch knot each context keeps the 112-128 slope per request."""
    decode = models[("llama-2-7b", "a100", 1)].coefficients.decode
    knots, batch_knots = decode.context_knots, decode.batch_size_knots
    assert knots[-1] == 4096 and batch_knots[-1] == 128
    for b in (1, 16, 128):
        values = decode.at_batch(b)
        slope = (values[-1] - values[-2]) / (knots[-1] - knots[-2])
        assert slope > 0.0
        for ctx in (5000, 50_000, 131_072):
            assert decode.per_layer_ms(b, ctx) == pytest.approx(values[-1] + slope * (ctx - knots[-1]))
    for ctx in (0, 1000, 4096):
        per_request = (decode.per_layer_ms(128, ctx) - decode.per_layer_ms(112, ctx)) / 16
        assert per_request > 0.0
        for b in (200, 4096):
            assert decode.per_layer_ms(b, ctx) == pytest.approx(decode.per_layer_ms(128, ctx) + per_request * (b - 128))


def test_segments_end_where_the_mean_context_reaches_the_next_knot(models):
    model = models[("llama-2-7b", "a100", 1)]
    knots = model.coefficients.decode.context_knots
    for batch in (1, 7, 128, 5000):
        for j in range(len(knots) - 2):
            for context in (batch * knots[j], batch * knots[j + 1] - 1):
                base, beta, end = model.decode_segment(batch, context)
                assert end == batch * knots[j + 1], (batch, j, context)
        assert model.decode_segment(batch, batch * knots[-2])[2] is None  # the last one is open
        # continuity across each knot (the time is one continuous function of the context)
        for knot in knots[1:-1]:
            below = model.decode_segment(batch, batch * knot - 1)
            at = model.iteration_time(batch, batch * knot)
            assert below[0] + below[1] * batch * knot == pytest.approx(at, rel=1e-9)


def test_vidur_rounding_uses_the_rounded_up_mean_context(models):
    """Vidur's predictor: mean of (context + 1) floored, rounded up to 256 tokens."""
    exact = models[("llama-2-7b", "a100", 1)]
    vidur = IterationTimeModel.for_replica("llama-2-7b", "a100", 1, overhead_s=0.0,
                                           decode_context_granularity=VIDUR_DECODE_CONTEXT_GRANULARITY)
    no_attention = exact.decode_base_time(8) - exact.decode_attention_time(8, 0)
    for contexts, rounded in [((0,) * 8, 256), ((255,) * 8, 256), ((256,) * 8, 512),
                              ((100, 300, 500, 700, 100, 300, 500, 700), 512),  # mean 400 -> 401 -> 512
                              ((4095,) * 8, 4096), ((9000,) * 8, 9216)]:
        total = sum(contexts)
        expected = no_attention + exact.decode_attention_time(8, 8 * rounded)
        assert vidur.iteration_time(8, total) == pytest.approx(expected, rel=1e-12)
        base, beta, end = vidur.decode_segment(8, total)
        assert beta == 0.0 and base == vidur.iteration_time(8, total)
        assert end == 8 * rounded and vidur.decode_segment(8, end - 1)[0] == base
        assert vidur.decode_segment(8, end)[0] > base
    # with a prefill chunk alongside, only the decode-attention term differs
    chunks = [(512, 0)]
    gap = vidur.iteration_time(8, 8 * 1000, chunks) - exact.iteration_time(8, 8 * 1000, chunks)
    assert gap == pytest.approx(exact.decode_attention_time(8, 8 * 1024) - exact.decode_attention_time(8, 8 * 1000))


@pytest.mark.parametrize(("batching", "granularity"), [
    ("mixed_chunked", None), ("mixed", None), ("vllm_v0", None), ("vllm_v0", VIDUR_DECODE_CONTEXT_GRANULARITY)])
def test_jump_matches_iteration_across_context_segments(batching, granularity):
    """Calibrated model, prompts of up to 900 tokens: decode stretches cross the 224, 256, 480
    and 512-token knots (or Vidur's 256-token steps) and are cut there; timestamps must equal
    those of iteration-by-iteration simulation, and the cuts must not cost the jump its gain."""
    config = ReplicaConfig(batching=batching)
    results = []
    for jump in (True, False):
        replicas = [build_replica(i, config, jump=jump) for i in range(2)]
        if granularity is not None:
            latency = IterationTimeModel.for_replica("llama-2-7b", "a100", 1, overhead_s=0.0,
                                                     decode_context_granularity=granularity)
            replicas = [Replica(r.id, config, latency, r.num_blocks, r.max_model_len, jump=jump) for r in replicas]
        cluster = Cluster(replicas, check_invariants=True)
        requests = run_episode(cluster, random_requests(3, n=250, qps=6.0, max_prompt=900, max_output=500))
        results.append((timestamps(requests), cluster))
    (jumped, jump_cluster), (stepped, iter_cluster) = results
    np.testing.assert_allclose(jumped, stepped, rtol=0, atol=1e-9)
    assert (sum(r.num_iterations for r in jump_cluster.replicas)
            == sum(r.num_iterations for r in iter_cluster.replicas))
    assert jump_cluster.num_events < iter_cluster.num_events / 2


def test_malformed_decode_table_is_rejected_naming_the_problem():
    doc = json.loads((COEFFICIENTS_DIR / "llama-2-7b__a100__tp1.json").read_text())
    entry = doc["decode_attention_per_layer_ms"]
    with pytest.raises(ValueError, match="does not match its knots"):
        DecodeAttention.from_dict({**entry, "ms": entry["ms"][:-1]})
    with pytest.raises(ValueError, match="knots must increase"):
        DecodeAttention.from_dict({**entry, "context_knots": list(reversed(entry["context_knots"]))})
    with pytest.raises(ValueError, match="unsupported coefficient schema 2"):
        LatencyCoefficients.from_dict({**doc, "schema_version": 2})
    with pytest.raises(ValueError, match="decode_context_granularity"):
        IterationTimeModel.for_replica("llama-2-7b", "a100", 1, decode_context_granularity=0)
