"""The prefix-sharing scenario family: validation, reproducible draws within the ranges, one
observation layout, episodes with a heuristic, and held-out settings outside the family."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_env.config import ConfigError, EnvConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import (
    SYSTEM_PROMPT_SPREAD,
    ScenarioFamilyEnv,
    ScenarioSampler,
    family_layout,
    family_trace_missing,
    load_family,
    prefix_holdout_scenarios,
)
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import run_episode

#: Cheap capacity measurements and short episodes (the ranges are the packaged family's).
FAST = dict(capacity_requests=200, episode_requests=96)
PREFIX = load_family("prefix")
TRACE_MISSING = family_trace_missing(PREFIX)
NEEDS_TRACE = pytest.mark.skipif(TRACE_MISSING is not None,
                                 reason=f"Mooncake trace not found ({TRACE_MISSING})")


def _family(kinds: tuple[str, ...] | None = None, **overrides):
    """The packaged family (fast settings), its workloads restricted to ``kinds`` and, when
    the Mooncake trace is absent, to the synthetic ones."""
    choices = [w for w in PREFIX.workloads if kinds is None or w.kind in kinds]
    if TRACE_MISSING is not None:
        choices = [w for w in choices if w.kind != "trace"]
    return load_family(PREFIX, {**FAST, "workloads": choices, **overrides})


def _choice(family, kind: str):
    return next(w for w in family.workloads if w.kind == kind)


# ------------------------------------------------------------------------- the generalist
#: ``ScenarioSampler(load_family("generalist", {"capacity_requests": 200}))`` draws for seeds
#: 0-4, recorded before the prefix fields existed: the generalist must not change.
GENERALIST_DRAWS = [
    {"replicas": 14, "gpus": {"a100": 9, "h100": 5}, "lengths": "lognormal(p~1386, o~120, s1.00)",
     "arrival": "phases(100 s, high/low 2.0)", "load": 0.653, "qps": 58.866,
     "capacity_rps": 90.098, "reward_scale": 0.4288616162996492},
    {"replicas": 9, "gpus": {"a100": 9}, "lengths": "lognormal(p~1386, o~14, s0.30)",
     "arrival": "phases(40 s, high/low 2.5)", "load": 0.575, "qps": 45.502,
     "capacity_rps": 79.112, "reward_scale": 2.639114479041113},
    {"replicas": 14, "gpus": {"a100": 10, "h100": 4}, "lengths": "lognormal(p~3330, o~347, s1.00)",
     "arrival": "poisson", "load": 0.336, "qps": 8.623, "capacity_rps": 25.676,
     "reward_scale": 0.19411410469202262},
    {"replicas": 14, "gpus": {"a40": 12, "h100": 2}, "lengths": "splitwise_conv",
     "arrival": "gamma(cv 1.32)", "load": 0.582, "qps": 25.228, "capacity_rps": 43.382,
     "reward_scale": 0.16789212554732347},
    {"replicas": 12, "gpus": {"h100": 12}, "lengths": "splitwise_conv", "arrival": "poisson",
     "load": 0.695, "qps": 91.047, "capacity_rps": 131.044, "reward_scale": 0.6423353464727944},
]


def test_generalist_draws_are_unchanged():
    family = load_family("generalist", {"capacity_requests": 200})
    assert family.workloads == () and not family.prefix_caching and family.holdout == ()
    sampler = ScenarioSampler(family)
    for seed, expected in enumerate(GENERALIST_DRAWS):
        config, info = sampler.sample(np.random.default_rng(seed))
        assert list(info) == ["family", "replicas", "gpus", "lengths", "arrival", "load", "qps",
                              "capacity_rps", "reward_scale"]
        for key, value in expected.items():
            assert info[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                 else value), (seed, key)
        assert all(not r.prefix_caching and not r.host_cache and r.gpu_memory_utilization == 0.9
                   for r in config.replicas)
    assert "r0/prefix_hit" not in family_layout(family).names


# ------------------------------------------------------------------------- bad input
TRACE = {"kind": "trace", "trace_rows": [0, 8400]}


@pytest.mark.parametrize("override, message", [
    ({"load": [1.1, 0.6]}, "family.load=(1.1, 0.6): empty or inverted range"),
    ({"workloads": [{**TRACE, "load": [1.0, 0.5]}]},
     "family.workloads[0].load=(1.0, 0.5): empty or inverted range"),
    ({"workloads": [{"kind": "multiturn", "turns_mean": [6, 2]}]},
     "family.workloads[0].turns_mean=(6.0, 2.0): empty or inverted range"),
    ({"workloads": [{"kind": "multiturn", "turn_gap_s": [0, 60]}]},
     "family.workloads[0].turn_gap_s=(0.0, 60.0): must lie within"),
    ({"workloads": [{"kind": "system_prompt", "num_prompts": [128, 8]}]},
     "family.workloads[0].num_prompts=(128, 8): empty or inverted range"),
    ({"workloads": [{"kind": "system_prompt", "zipf_s": [1.4, 0.6]}]},
     "family.workloads[0].zipf_s=(1.4, 0.6): empty or inverted range"),
    ({"workloads": [{"kind": "system_prompt", "prompt_tokens": [4096, 256]}]},
     "family.workloads[0].prompt_tokens=(4096.0, 256.0): empty or inverted range"),
    ({"gpu_memory_utilization": [0.9, 0.5]},
     "family.gpu_memory_utilization=(0.9, 0.5): empty or inverted range"),
    ({"gpu_memory_utilization": [0.2, 0.9]},
     "family.gpu_memory_utilization=(0.2, 0.9): the lowest fraction does not fit"),
    ({"host_cache_gb": [256, 64]}, "family.host_cache_gb=(256.0, 64.0): empty or inverted range"),
    ({"workloads": [{"kind": "trace", "trace_rows": [8400, 13000]}]},
     "family.workloads[0].trace_rows=(8400, 13000): ends past the trace's last row "
     "(trace_length=12031 rows)"),
    ({"workloads": [{"kind": "trace", "trace_rows": [8400, 0]}]},
     "family.workloads[0].trace_rows=(8400, 0): empty or inverted row range"),
    ({"workloads": [TRACE, {"kind": "trace", "trace_rows": [8000, 8400]}]},
     "family.workloads[1].trace_rows=(8000, 8400): holds 400 rows, fewer than the 512 requests "
     "of an episode"),
    ({"workloads": [{"kind": "sessions"}]},
     "family.workloads[0].kind='sessions': expected one of ['trace', 'multiturn', "
     "'system_prompt']"),
    ({"workloads": [{"weight": 0.0, "kind": "multiturn"}]},
     "family.workloads[0].weight=0.0: must be > 0"),
    ({"host_cache": 1.5}, "family.host_cache=1.5: a probability: must be in [0, 1]"),
    ({"host_cache": -0.1}, "family.host_cache=-0.1: a probability: must be in [0, 1]"),
    ({"prefix_caching": False}, "family.host_cache=0.5: the host tier extends the prefix cache"),
    ({"mixed_gpus": 1.2}, "family.mixed_gpus=1.2: must be in [0, 1]"),
    ({"holdout": ["nope"]}, "family.holdout[0]='nope': unknown scenario"),
])
def test_bad_prefix_family_settings_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_family("prefix", override)
    assert message in str(err.value)


def test_a_missing_trace_is_refused_by_key_before_any_draw():
    family = load_family("prefix", {"workloads": [{**TRACE, "trace_path": "no/such.jsonl"}]})
    assert family_trace_missing(family) == "no/such.jsonl"
    with pytest.raises(ConfigError, match=r"family.workloads\[0\].trace_path='no/such.jsonl': "
                                          "trace file not found"):
        ScenarioSampler(family)


@NEEDS_TRACE
def test_a_trace_with_other_rows_than_declared_is_refused():
    family = load_family("prefix", {"workloads": [{**TRACE, "trace_length": 12_000}]})
    with pytest.raises(ConfigError, match=r"family.workloads\[0\].trace_length=12000: but .* "
                                          "has 12031 rows"):
        ScenarioSampler(family)


# ------------------------------------------------------------------------- draws
def _check_draw(family, config: EnvConfig, info: dict) -> None:
    """``config`` is a valid draw of ``family``, inside every range."""
    lo, hi = family.replicas
    assert isinstance(config, EnvConfig) and lo <= config.num_replicas <= hi
    assert config.observation.replica_slots == 16
    assert config.episode_requests == family.episode_requests
    (first,) = set(config.replicas)  # one replica config for the whole cluster
    assert (first.model, first.gpu, first.prefix_caching) == ("llama-3.1-8b", "a100", True)
    low, high = family.gpu_memory_utilization
    assert low <= first.gpu_memory_utilization <= high
    assert first.host_cache == (info["host_cache_gb"] > 0)
    if first.host_cache:
        low, high = family.host_cache_gb
        assert low <= first.host_cache_gb <= high
    assert family.load[0] <= info["load"] <= family.load[1]
    workload = config.workload
    choice = _choice(family, info["workload"])
    if choice.kind == "trace":
        begin, end = choice.trace_rows
        assert workload.arrival == workload.lengths == "trace"
        assert begin <= workload.trace_start <= end - family.episode_requests
        assert workload.trace_qps == pytest.approx(info["load"] * info["capacity_rps"], rel=1e-3)
    elif choice.kind == "multiturn":
        sessions = workload.multiturn
        assert workload.prefix == "multiturn" and workload.arrival == "poisson"
        assert choice.turns_mean[0] <= sessions.turns_mean <= choice.turns_mean[1]
        assert choice.turn_gap_s[0] <= sessions.turn_gap_s <= choice.turn_gap_s[1] + 1e-6
        low, high = choice.system_prompt_tokens
        assert low <= sessions.system_prompt_tokens <= high
        assert workload.qps == pytest.approx(info["load"] * info["capacity_rps"], rel=1e-3)
    else:
        prompts = workload.system_prompt
        assert workload.prefix == "system_prompt" and workload.arrival in ("poisson", "gamma")
        assert choice.num_prompts[0] <= prompts.num_prompts <= choice.num_prompts[1]
        assert choice.zipf_s[0] <= prompts.zipf_s <= choice.zipf_s[1]
        shortest = choice.prompt_tokens[0] * (1 - SYSTEM_PROMPT_SPREAD)
        longest = choice.prompt_tokens[1] * (1 + SYSTEM_PROMPT_SPREAD)
        assert shortest - 1 <= prompts.prompt_tokens_range[0] <= prompts.prompt_tokens_range[1] \
            <= longest + 1


def test_draws_are_reproducible_and_inside_the_ranges():
    family = _family()
    sampler = ScenarioSampler(family)
    kinds = set()
    for seed in range(16):
        config, info = sampler.sample(np.random.default_rng(seed))
        again, info2 = sampler.sample(np.random.default_rng(seed))
        assert again == config and info2 == info
        _check_draw(family, config, info)
        kinds.add(info["workload"])
    assert kinds == {w.kind for w in family.workloads}


def test_every_draw_shares_one_observation_layout_with_the_prefix_features():
    env = ScenarioFamilyEnv(_family())
    names = env.layout.names
    for feature in ("prefix_hit", "prefix_index_fill", "cache_usage"):
        assert f"r0/{feature}" in names and f"r15/{feature}" in names
    for seed in range(6):
        obs, info = env.reset(seed=seed)
        assert obs.shape == env.observation_space.shape
        assert env.env.layout.names == names
        obs, *_ = env.step(0)
        assert obs.shape == env.observation_space.shape and env.action_space.n == 16


@pytest.mark.parametrize("kind", ["trace", "multiturn", "system_prompt"])
def test_an_episode_of_each_kind_runs_with_a_cache_aware_heuristic(kind):
    if kind == "trace" and TRACE_MISSING is not None:
        pytest.skip(f"Mooncake trace not found ({TRACE_MISSING})")
    env = ScenarioFamilyEnv(_family((kind,), replicas=[4, 6]))
    metrics, _ = run_episode(env, make_router("sglang_cache_aware"), seed=3)
    assert env.scenario["workload"] == kind
    assert metrics["num_requests"] == FAST["episode_requests"]
    assert metrics["prefix_hit_rate_tokens"] > 0.0
    assert len(env.env.dispatch_counts) == env.num_replicas


# ------------------------------------------------------------------------- held out
def test_held_out_settings_lie_outside_the_family():
    names = prefix_holdout_scenarios()
    assert names == PREFIX.holdout and len(names) == 3
    workloads = {name: EnvConfig.from_kwargs(scenario=name).workload for name in names}
    traces = [w for w in workloads.values() if w.arrival == "trace"]
    sessions = [w.multiturn for w in workloads.values() if w.prefix == "multiturn"]
    prompts = [w.system_prompt for w in workloads.values() if w.prefix == "system_prompt"]
    assert len(traces) == len(sessions) == len(prompts) == 1
    trained = _choice(PREFIX, "trace")
    assert traces[0].trace_rows == (8400, 12031) and trained.trace_rows[1] <= 8400
    multiturn = _choice(PREFIX, "multiturn")
    assert sessions[0].turns_mean > multiturn.turns_mean[1]
    assert sessions[0].turn_gap_s > multiturn.turn_gap_s[1]
    system = _choice(PREFIX, "system_prompt")
    assert prompts[0].num_prompts > system.num_prompts[1]
    assert prompts[0].prompt_tokens_range[0] > system.prompt_tokens[1] * (1 + SYSTEM_PROMPT_SPREAD)


@pytest.mark.parametrize("name", ["prefix_holdout_multiturn", "prefix_holdout_system_prompt",
                                  "prefix_holdout_mooncake"])
def test_held_out_scenarios_run_in_the_family_layout(name):
    if "mooncake" in name and TRACE_MISSING is not None:
        pytest.skip(f"Mooncake trace not found ({TRACE_MISSING})")
    env = LLMClusterEnv(scenario=name, episode_requests=64, observation={"replica_slots": 16})
    assert env.layout.names == family_layout(PREFIX).names
    metrics, _ = run_episode(env, make_router("sglang_cache_aware"), seed=0)
    assert metrics["num_requests"] == 64
