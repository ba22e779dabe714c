"""Workloads with prefixes: Mooncake JSONL parsing and its bad input, multi-turn sessions,
shared system prompts, oversize clipping of chains, replay of a Mooncake file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_env.config import ConfigError, EnvConfig, WorkloadConfig
from llm_cluster_env.tools.replay import main as replay_main
from llm_cluster_env.tools.replay import replay
from llm_cluster_env.validation import from_dict
from llm_cluster_env.workload import TraceError, WorkloadGenerator, load_trace
from llm_cluster_env.workload.prefix import (
    load_mooncake_trace,
    system_prompt_lengths,
    trace_chains,
)

REPO = Path(__file__).resolve().parents[1]
MOONCAKE = REPO.parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"

LINES = [
    {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 700, "output_length": 9, "hash_ids": [0, 3]},
    {"timestamp": 1500, "input_length": 1600, "output_length": 2, "hash_ids": [0, 1, 2, 4]},
    {"timestamp": 2000, "input_length": 600, "output_length": 4, "hash_ids": [5, 1]},
]


def write_jsonl(tmp_path, records, name="trace.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


# ----------------------------------------------------------------------------- Mooncake


def test_mooncake_lines_become_chained_segments(tmp_path):
    trace = load_trace(write_jsonl(tmp_path, LINES))
    assert trace.arrival_times.tolist() == [0.0, 0.0, 1.5, 2.0]
    assert trace.prompt_tokens.tolist() == [1100, 700, 1600, 600]
    a, b, c, d = trace.segments
    assert c[:3] == a and b[0] == a[0] and b[1] not in a
    assert d[1] != a[1]  # id 1 after id 5 is another prefix: another segment
    assert trace.num_segments == len(set(a + b + c + d))
    assert trace.session_keys.tolist() == [a[1], b[1], c[1], d[1]]  # first two blocks
    assert trace.line_of(2) == 3
    chains = trace_chains(trace, np.arange(4))
    assert chains[0].ids == a + (-1,) and chains[0].token_starts == (0, 512, 1024, 1100)
    assert chains[3].token_starts == (0, 512, 600)


def test_mooncake_replay_windows_that_wrap_get_new_segment_ids(tmp_path):
    trace = load_trace(write_jsonl(tmp_path, LINES))
    first, again = trace_chains(trace, np.array([0, 0]), np.array([0, 1]))
    assert set(first.ids[:-1]).isdisjoint(again.ids[:-1])
    assert again.ids[0] == first.ids[0] + trace.num_segments


def test_fewer_ids_than_blocks_leave_the_rest_of_the_prompt_unique(tmp_path):
    trace = load_trace(write_jsonl(tmp_path, [
        {"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [0]}]))
    (chain,) = trace_chains(trace, np.array([0]))
    assert chain.token_starts == (0, 512)  # tokens 512.. are the request's own


BAD_LINES = {
    "hash_ids not a list": ({"hash_ids": "0,1"}, "line 2, column 'hash_ids'.*list of integers"),
    "hash id not an integer": ({"hash_ids": [0, "x"]}, "line 2, column 'hash_ids'.*element 1"),
    "hash id a boolean": ({"hash_ids": [True]}, "line 2, column 'hash_ids'.*element 0"),
    "negative hash id": ({"hash_ids": [-4]}, "line 2, column 'hash_ids'.*element 0"),
    "too many ids": ({"input_length": 1025, "hash_ids": [0, 1, 2, 3]},
                     r"line 2, column 'hash_ids'.*ceil\(1025 / 512\) = 3 blocks.*'4 ids'"),
    "timestamp backwards": ({"timestamp": -0.5 + 0}, "line 2, column 'timestamp'.*>= 0"),
    "zero input": ({"input_length": 0}, "line 2, column 'input_length'.*>= 1"),
    "fractional output": ({"output_length": 2.5}, "line 2, column 'output_length'.*whole"),
    "missing field": ({"hash_ids": None}, "line 2, column 'hash_ids'.*missing field"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_mooncake_line_names_line_and_field(tmp_path, case):
    patch, message = BAD_LINES[case]
    line = {"timestamp": 10, "input_length": 900, "output_length": 3, "hash_ids": [0, 1]}
    line.update(patch)
    if patch.get("hash_ids", 0) is None:
        del line["hash_ids"]
    path = write_jsonl(tmp_path, [LINES[0], line])
    with pytest.raises(TraceError, match=message) as err:
        load_trace(path)
    assert err.value.line == 2 and str(path) in str(err.value)


def test_timestamp_going_backwards_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path, [LINES[0], LINES[2], {**LINES[3], "timestamp": 1000}])
    with pytest.raises(TraceError, match=r"line 3, column 'timestamp'.*goes backwards: line 2 "
                                         r"arrived at 1500"):
        load_trace(path)


@pytest.mark.parametrize("text,message", [("[1, 2]", "expected a JSON object"),
                                          ("{oops", "not valid JSON")])
def test_a_line_that_is_not_a_json_object_is_refused(tmp_path, text, message):
    with pytest.raises(TraceError, match=f"line 2: .*{message}"):
        load_trace(write_jsonl(tmp_path, [LINES[0], text]))


def test_hash_block_size_is_configurable(tmp_path):
    path = write_jsonl(tmp_path, [{"timestamp": 0, "input_length": 300, "output_length": 1,
                                   "hash_ids": [0, 1, 2]}])
    with pytest.raises(TraceError, match="ceil"):
        load_trace(path)
    trace = load_trace(path, hash_block_tokens=128)
    (chain,) = trace_chains(trace, np.array([0]))
    assert chain.token_starts == (0, 128, 256, 300)


def test_clipping_a_mooncake_prompt_cuts_its_chain(tmp_path):
    path = write_jsonl(tmp_path, LINES)
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_path=str(path), trace_start=0)
    generator = WorkloadGenerator(config, max_total_tokens=800)
    episode = generator.sample(4, np.random.default_rng(0))
    assert episode.num_clipped == 2
    for prompt, chain in zip(episode.prompt_tokens.tolist(), episode.chains):
        assert chain.token_starts[-1] <= prompt and all(t < prompt for t in
                                                         chain.token_starts[:-1])
    assert episode.chains[0].token_starts == (0, 512, int(episode.prompt_tokens[0]))


def test_reject_drops_the_chains_of_rejected_requests(tmp_path):
    config = WorkloadConfig(arrival="trace", lengths="trace", trace_start=0,
                            trace_path=str(write_jsonl(tmp_path, LINES)),
                            oversize_policy="reject")
    episode = WorkloadGenerator(config, max_total_tokens=800).sample(4, np.random.default_rng(0))
    assert len(episode) == 2 and len(episode.chains) == 2
    assert [c.token_starts[-1] for c in episode.chains] == [700, 600]


def test_replay_of_a_mooncake_file_reports_cached_tokens(tmp_path):
    lines = [{"timestamp": 100 * i, "input_length": 900 + 50 * (i % 3), "output_length": 4,
              "hash_ids": [0, 1] if i % 2 else [0]} for i in range(30)]
    path = write_jsonl(tmp_path, lines)
    kwargs = {"scenario": "a100x4_conv_70", "num_replicas": 1,
              "replica": {"model": "llama-3-8b", "prefix_caching": True}}
    result = replay(path, kwargs, router="round_robin")
    cached = result.records["cached_prompt_tokens"]
    assert cached[0] == 0 and (cached[2:] >= 512).all()
    assert result.metrics["prefix_hit_rate_tokens"] == pytest.approx(
        cached.sum() / result.records["prompt_tokens"].sum())
    out = tmp_path / "out.csv"
    assert replay_main(["--requests", str(path), "--scenario", "a100x4_conv_70",
                        "--set", "replica.prefix_caching=true", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0].endswith(",cached_prompt_tokens,host_prompt_tokens")


def test_replay_of_a_bad_mooncake_file_writes_nothing(tmp_path, capsys):
    path = write_jsonl(tmp_path, [LINES[0], {**LINES[1], "hash_ids": {"a": 1}}])
    out = tmp_path / "out.csv"
    assert replay_main(["--requests", str(path), "--scenario", "a100x4_conv_70",
                        "--out", str(out)]) == 2
    assert "line 2, column 'hash_ids'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.shared_data
def test_the_mooncake_release_loads_and_matches_its_readme():
    if not MOONCAKE.is_file():
        pytest.skip(f"Mooncake trace not found at {MOONCAKE}")
    trace = load_mooncake_trace(MOONCAKE)
    assert len(trace) == 12031
    assert trace.prompt_tokens.mean() == pytest.approx(12035, abs=1)
    assert trace.prompt_tokens.max() == 126195
    seen, hits, total = set(), 0, 0
    for segments in trace.segments:  # unbounded cache: 36.6% of blocks are prefix hits
        k = 0
        while k < len(segments) and segments[k] in seen:
            k += 1
        hits += k
        total += len(segments)
        seen.update(segments)
    assert hits / total == pytest.approx(0.366, abs=0.0005)


# ----------------------------------------------------------------------------- multi-turn


def _generator(prefix, cap=8192, **workload):
    config = from_dict(WorkloadConfig, dict(prefix=prefix, lengths="uniform",
                                            prompt_tokens_range=(50, 400),
                                            output_tokens_range=(10, 300), **workload))
    return WorkloadGenerator(config, max_total_tokens=cap)


def test_multiturn_turns_extend_the_conversation_by_its_outputs():
    gen = _generator("multiturn", qps=20.0, multiturn={"turns_mean": 5.0, "turn_gap_s": 10.0,
                                                        "system_prompt_tokens": 300})
    episode = gen.sample(3000, np.random.default_rng(3))
    assert len(episode) == 3000 and np.all(np.diff(episode.arrival_times) >= 0)
    by_session: dict[int, list[int]] = {}
    for i, chain in enumerate(episode.chains):
        assert chain.ids[0] == 0 and chain.token_starts == (0, 300)
        by_session.setdefault(chain.session_key, []).append(i)
    grew = 0
    for turns in by_session.values():
        for prev, nxt in zip(turns, turns[1:]):
            gap = episode.prompt_tokens[nxt] - episode.prompt_tokens[prev] - \
                episode.output_tokens[prev]
            assert 50 <= gap <= 400  # the next turn = previous prompt + output + new tokens
            grew += 1
    assert grew > 1000
    assert (episode.prompt_tokens + episode.output_tokens <= 8192).all()
    rate = (len(episode) - 1) / (episode.arrival_times[-1] - episode.arrival_times[0])
    assert rate == pytest.approx(20.0, rel=0.1)


def test_multiturn_sessions_end_before_the_context_cap():
    gen = _generator("multiturn", cap=1500, qps=10.0, multiturn={"turns_mean": 8.0})
    episode = gen.sample(2000, np.random.default_rng(0))
    assert episode.num_clipped == 0
    assert (episode.prompt_tokens + episode.output_tokens <= 1500).all()


def test_multiturn_is_deterministic_per_generator_state():
    gen = _generator("multiturn", qps=5.0)
    assert gen.sample(500, np.random.default_rng(9)) == gen.sample(500, np.random.default_rng(9))


def test_multiturn_needs_poisson_sessions_and_synthetic_lengths():
    with pytest.raises(ConfigError, match="arrival='gamma'.*set arrival='poisson'"):
        WorkloadConfig(prefix="multiturn", arrival="gamma")
    with pytest.raises(ConfigError, match="prefix='system_prompt'.*not from a trace"):
        WorkloadConfig(prefix="system_prompt", lengths="trace", trace_path="x.csv")
    with pytest.raises(ConfigError, match=r"workload.multiturn.turns_mean=0.5"):
        EnvConfig.from_kwargs(workload={"prefix": "multiturn", "multiturn": {"turns_mean": 0.5}})


# ----------------------------------------------------------------------------- system prompts


def test_system_prompts_are_zipf_popular_and_prefix_every_prompt():
    gen = _generator("system_prompt", qps=5.0,
                     system_prompt={"num_prompts": 16, "zipf_s": 1.2})
    episode = gen.sample(20000, np.random.default_rng(1))
    lengths = system_prompt_lengths(gen.config.system_prompt)
    tenants = np.array([c.ids[0] for c in episode.chains])
    starts = np.array([c.token_starts[1] for c in episode.chains])
    np.testing.assert_array_equal(starts, lengths[tenants])
    user = episode.prompt_tokens - starts
    assert user.min() >= 50 and user.max() <= 400
    weights = np.arange(1, 17) ** -1.2
    np.testing.assert_allclose(np.bincount(tenants, minlength=16) / len(tenants),
                               weights / weights.sum(), atol=0.01)
    assert [c.session_key for c in episode.chains[:5]] == tenants[:5].tolist()
    assert len({c.ids[1] for c in episode.chains}) == len(episode)  # unique user parts
