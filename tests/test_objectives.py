"""Named objectives over episode metrics (llm_cluster_env.tools.objectives)."""

from __future__ import annotations

import math

import pytest

from llm_cluster_env.config import ConfigError
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.tools.evaluation import run_episode
from llm_cluster_env.tools.objectives import OBJECTIVES, Objective, make_objective

METRICS = {"ttft_mean": 2.0, "e2e_p99": 40.0, "goodput_rps": 1.25, "e2e_mean": 9.0}


def test_values_and_sign_convention():
    assert OBJECTIVES == ("mean_e2e", "mean_ttft", "ttft_e2e", "goodput")
    e2e = make_objective("mean_e2e")
    assert e2e.value(METRICS) == 9.0 == e2e.loss(METRICS) and not e2e.higher_is_better
    ttft = make_objective("mean_ttft")
    assert ttft.value(METRICS) == 2.0 and ttft.loss(METRICS) == 2.0
    assert not ttft.higher_is_better and ttft.unit == "s"
    mix = make_objective("ttft_e2e", e2e_p99_weight=0.05)
    assert mix.value(METRICS) == 2.0 + 0.05 * 40.0 == mix.loss(METRICS)
    assert not mix.higher_is_better
    goodput = make_objective("goodput")
    assert goodput.higher_is_better and goodput.unit == "requests/s"
    assert goodput.value(METRICS) == 1.25 and goodput.loss(METRICS) == -1.25
    assert str(mix) == "ttft_e2e(e2e_p99_weight=0.05)" and str(goodput) == "goodput"


def test_loss_ranks_a_better_episode_lower_for_every_objective():
    worse = {"ttft_mean": 3.0, "e2e_p99": 50.0, "goodput_rps": 1.0, "e2e_mean": 10.0}
    for objective in (make_objective("mean_e2e"), make_objective("mean_ttft"), make_objective("goodput"),
                      make_objective("ttft_e2e", e2e_p99_weight=0.1)):
        assert objective.loss(METRICS) < objective.loss(worse), objective


def test_ttft_e2e_with_zero_weight_is_mean_ttft():
    assert make_objective("ttft_e2e", e2e_p99_weight=0.0).value(METRICS) == 2.0


def test_unknown_name_is_refused_naming_key_and_value():
    with pytest.raises(ConfigError, match=r"^objective='p99_ttft': unknown \(known: mean_e2e, "
                                          r"mean_ttft, ttft_e2e, goodput\)"):
        make_objective("p99_ttft")


@pytest.mark.parametrize("weight", [None, -0.1, math.nan, math.inf, True])
def test_ttft_e2e_needs_a_finite_non_negative_weight(weight):
    with pytest.raises(ValueError, match=rf"^e2e_p99_weight={weight!r}: objective 'ttft_e2e'"):
        make_objective("ttft_e2e", e2e_p99_weight=weight)


def test_weight_on_another_objective_is_refused():
    with pytest.raises(ValueError, match=r"^e2e_p99_weight=0.1: only objective 'ttft_e2e'"):
        Objective("goodput", 0.1)


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match=r"no 'goodput_rps'"):
        make_objective("goodput").value({"ttft_mean": 1.0})


def test_objectives_read_real_episode_metrics():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=120)
    metrics, _ = run_episode(env, make_router("lor"), seed=2)
    assert make_objective("mean_ttft").value(metrics) == metrics["ttft_mean"] > 0
    assert make_objective("goodput").loss(metrics) == -metrics["goodput_rps"] < 0
    mix = make_objective("ttft_e2e", e2e_p99_weight=0.5)
    assert mix.value(metrics) == pytest.approx(metrics["ttft_mean"] + 0.5 * metrics["e2e_p99"])
