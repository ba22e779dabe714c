"""The rollout planner's and the look-ahead's selectable objectives (issue 21 item 1): the
cost each objective computes, the registry names, and the refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import follow_base, planner

from llm_cluster_env.config import ConfigError
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.routing.lookahead import LookaheadRouter
from llm_cluster_env.routing.planner import PlannerConfig, RolloutPlannerRouter
from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
from llm_cluster_env.tools.objectives import rollout_loss


def req(arrival, first, finish, output):
    return SimpleNamespace(arrival_time=arrival, first_token_time=first, finish_time=finish,
                           output_tokens=output)


# ------------------------------------------------------------------ the rollout losses
def test_rollout_losses_on_hand_made_requests():
    now = 10.0
    done = [req(4.0, 6.0, 20.0, 8),     # first token before now: no TTFT left, 10 s in system
            req(8.0, 12.0, 13.0, 11),   # waiting at now: 2 s to its first token, 3 s in system
            req(11.0, 11.5, 15.5, 1)]   # arrives later: TTFT 0.5 s, E2E 4.5 s, no TPOT
    assert rollout_loss("mean_ttft", done, now) == pytest.approx(2.5)
    assert rollout_loss("mean_e2e", done, now) == pytest.approx(17.5)
    assert rollout_loss("mean_e2e", done, now, area=99.0) == 99.0  # the copy's accumulator
    assert rollout_loss("ttft_e2e", done, now, e2e_weight=0.2) == pytest.approx(2.5 + 3.5)
    # TTFT <= 4 s: the 1st (2 s) and 2nd (4 s) and 3rd (0.5 s); TPOT <= 1 s: 1st 14/7 = 2 s
    # fails, 2nd 1/10 = 0.1 s passes, the 3rd has one token (no TPOT): 2 requests met
    assert rollout_loss("goodput", done, now, ttft_slo_s=4.0, tpot_slo_s=1.0) == -2.0
    assert rollout_loss("goodput", done, now, ttft_slo_s=0.4, tpot_slo_s=1.0) == 0.0
    with pytest.raises(ValueError, match="objective 'goodput' needs both SLO targets"):
        rollout_loss("goodput", done, now, ttft_slo_s=1.0)


def test_clairvoyant_rollout_costs_are_the_realised_differences_of_each_objective():
    """True future, every later arrival re-routed by least_added_time, horizon past the end:
    each objective's cost differences between candidates are the realised differences of the
    episode's total TTFT, total TTFT + w x total E2E, and minus the requests meeting the SLO."""
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=140)
    seed, d = 3, 80
    actions, _ = follow_base(env, seed, d)
    common = {"horizon_s": 1e6, "candidates": 3, "clairvoyant": True, "assignment": "reroute"}
    slo = {"slo_ttft_s": 0.3, "slo_tpot_s": 0.03}
    estimates = {
        "mean_ttft": planner(env, objective="mean_ttft", **common).estimate(env.view),
        "ttft_e2e": planner(env, objective="ttft_e2e", e2e_weight=0.5, **common
                            ).estimate(env.view),
        "goodput": planner(env, objective="goodput", **slo, **common).estimate(env.view)}
    candidates = estimates["mean_ttft"].candidates
    assert all(e.candidates == candidates for e in estimates.values())
    realised = {key: [] for key in estimates}
    for c in candidates:
        follow_base(env, seed, d, actions)
        _, _, done, _, info = env.step(c)
        base = make_router("least_added_time")
        base.reset(env.num_replicas, np.random.default_rng(0))
        while not done:
            _, _, done, _, info = env.step(base.select(env.view))
        r = info["requests"]
        tpot_ok = np.isnan(r["tpot_s"]) | (r["tpot_s"] <= slo["slo_tpot_s"])
        realised["mean_ttft"].append(r["ttft_s"].sum())
        realised["ttft_e2e"].append(r["ttft_s"].sum() + 0.5 * r["e2e_s"].sum())
        realised["goodput"].append(-np.count_nonzero((r["ttft_s"] <= slo["slo_ttft_s"])
                                                     & tpot_ok))
    for key, est in estimates.items():
        got = est.costs[0] - est.costs[0, 0]
        want = np.array(realised[key], dtype=float) - realised[key][0]
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=key)
    assert np.ptp(realised["mean_ttft"]) > 0.05  # the choice matters to TTFT here


def test_ttft_and_e2e_objectives_choose_differently_and_each_is_the_lookahead():
    """With no arrival in the horizon the planner is the oracle look-ahead of the same
    objective; on this episode some decision has a TTFT-best replica that is not the E2E-best
    one (a prefill put ahead of decodes: quick first token, slower decodes), and each
    objective's planner takes its own look-ahead's choice there."""
    env = LLMClusterEnv(scenario="a100x4_conv_90", episode_requests=140)
    actions, _ = follow_base(env, 1)
    found = 0
    for d in range(40, 140, 4):
        follow_base(env, 1, d, actions)
        look = {o: LookaheadRouter(oracle=True, objective=o).costs(env.view)
                for o in ("mean_e2e", "mean_ttft")}
        plans = {o: planner(env, objective=o, horizon_s=1e-9, candidates=4,
                            clairvoyant=True).estimate(env.view)
                 for o in ("mean_e2e", "mean_ttft")}
        for o in look:
            cands = list(plans[o].candidates)
            np.testing.assert_allclose(plans[o].costs[0] - plans[o].costs[0, 0],
                                       look[o][cands] - look[o][cands[0]], atol=1e-6)
        if int(np.argmin(look["mean_e2e"])) != int(np.argmin(look["mean_ttft"])):
            found += 1
            assert plans["mean_e2e"].choice == int(np.argmin(look["mean_e2e"]))
            assert plans["mean_ttft"].choice == int(np.argmin(look["mean_ttft"]))
    assert found >= 1


def test_goodput_with_targets_nobody_misses_keeps_the_base_choice():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=120)
    follow_base(env, 2, 70)
    est = planner(env, objective="goodput", slo_ttft_s=1e6, slo_tpot_s=1e6, samples=2,
                  candidates=3).estimate(env.view)
    # every request of a future meets them whatever the choice: one count per future
    assert np.all(est.costs == est.costs[:, :1]) and np.all(est.costs < 0)
    assert est.choice == est.candidates[0]


def test_goodput_reads_the_bound_env_slo_unless_given():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=20, slo={"ttft_s": 2.0,
                                                                           "tpot_s": 0.2})
    env.reset(seed=0)
    assert planner(env, objective="goodput").slo_targets() == (2.0, 0.2)
    assert planner(env, objective="goodput", slo_ttft_s=0.7).slo_targets() == (0.7, 0.2)
    unbound = RolloutPlannerRouter(PlannerConfig(objective="goodput"))
    unbound.reset(env.num_replicas, np.random.default_rng(0))
    with pytest.raises(ValueError, match="objective='goodput' needs SLO targets"):
        unbound.select(env.view)


def test_mean_e2e_objective_is_the_historical_cost():
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=120)
    follow_base(env, 4, 60)
    default = planner(env, samples=2, candidates=3).estimate(env.view)
    named = planner(env, samples=2, candidates=3, objective="mean_e2e").estimate(env.view)
    np.testing.assert_array_equal(default.costs, named.costs)
    ttft = planner(env, samples=2, candidates=3, objective="mean_ttft").estimate(env.view)
    assert not np.array_equal(default.costs, ttft.costs)


# ------------------------------------------------------------------ names and refusals
@pytest.mark.parametrize("fields, message", [
    ({"objective": "p99"}, r"planner.objective='p99': must be one of"),
    ({"e2e_weight": math.nan}, r"planner.e2e_weight=nan: must be a finite number >= 0"),
    ({"e2e_weight": math.inf}, r"planner.e2e_weight=inf"),
    ({"e2e_weight": -0.1}, r"planner.e2e_weight=-0.1"),
    ({"e2e_weight": True}, r"planner.e2e_weight=True"),
    ({"slo_ttft_s": 0.0}, r"planner.slo_ttft_s=0.0: must be a finite number of seconds > 0"),
    ({"slo_ttft_s": -1.0}, r"planner.slo_ttft_s=-1.0"),
    ({"slo_tpot_s": math.nan}, r"planner.slo_tpot_s=nan"),
    ({"slo_tpot_s": 0}, r"planner.slo_tpot_s=0: must be"),
])
def test_bad_objective_settings_name_the_key_and_value(fields, message):
    with pytest.raises(ConfigError, match=message):
        PlannerConfig(**fields)


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "goodput"}, r"lookahead.objective='goodput': must be one of"),
    ({"objective": "mean_ttft", "e2e_weight": math.nan}, r"lookahead.e2e_weight=nan"),
])
def test_bad_lookahead_objective_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LookaheadRouter(**kwargs)


def test_objective_variants_are_named_but_not_run_by_all():
    names = {"rollout_planner": "mean_e2e", "rollout_planner_ttft": "mean_ttft",
             "rollout_planner_ttft_e2e": "ttft_e2e", "rollout_planner_goodput": "goodput"}
    for name, objective in names.items():
        assert name in ALL_ROUTERS and name not in ROUTERS
        router = make_any_router(name)
        assert router.name == name and router.config.objective == objective
    assert "lookahead_ttft" in ALL_ROUTERS and "lookahead_ttft" not in ROUTERS
    assert make_any_router("lookahead_ttft").objective == "mean_ttft"
    assert make_any_router("lookahead").objective == "mean_e2e"
    with pytest.raises(ConfigError, match=r"planner.objective='goodput': router "
                                          r"'rollout_planner_ttft' plans for 'mean_ttft'"):
        make_any_router("rollout_planner_ttft", config=PlannerConfig(objective="goodput"))
    custom = make_any_router("rollout_planner_ttft",
                             config=PlannerConfig(objective="mean_ttft", samples=2))
    assert custom.config.samples == 2
