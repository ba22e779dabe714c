"""benchmarks/generalisation.py: its cells, its statistics and verdicts, and a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import generalisation as gen
from llm_cluster_env.env.family import ScenarioSampler, load_family

#: Cells added for issue 20 (items 4-5): each must differ from every family draw in a way
#: :func:`off_family_reasons` can check, not only in its exact (continuous) load.
NEW_CELLS = ("longprompt_bursty_2xA100_2xH100", "longprompt_2xA100_2xH100_92", "conv_3gpu_93",
             "conv_phases3x_4xA100", "longprompt_phases3x_2xA100_2xH100")


@pytest.fixture(scope="module")
def family():
    return load_family("generalist")


@pytest.fixture(scope="module")
def cache():
    return {}


# ---------------------------------------------------------------------------------- cells
def test_grid_has_the_issue_cells():
    cells = gen.CELLS
    hetero = ("a100", "a100", "h100", "h100")
    long_hetero = {c.arrival for c in cells.values()
                   if c.gpus == hetero and c.lengths == gen.LONG_PROMPT}
    assert {"poisson", "gamma", "phases"} <= long_hetero
    assert any(c.arrival == "gamma" and c.cv == 3.0 and c.gpus == hetero for c in cells.values())
    assert sum(c.arrival == "phases" and c.high_to_low == 3.0 for c in cells.values()) >= 1
    assert sum(0.90 <= c.load <= 0.95 for c in cells.values()) >= 3
    assert set(NEW_CELLS) <= set(cells)


@pytest.mark.parametrize("name", list(gen.CELLS))
def test_cells_build_at_their_load(name, cache):
    cell = gen.CELLS[name]
    config = gen.cell_config(name, 64, cache=cache)
    assert [r.gpu for r in config.replicas] == list(cell.gpus)
    capacity = gen._capacity(list(cell.gpus), gen.WorkloadConfig(**cell.lengths), cache)
    workload = config.workload
    if cell.arrival == "phases":
        high, low = workload.phases
        assert high.qps / low.qps == pytest.approx(cell.high_to_low)
        assert 0.5 * (high.qps + low.qps) == pytest.approx(cell.load * capacity)
        assert high.duration_s == low.duration_s == cell.phase_s
    else:
        assert workload.qps == pytest.approx(cell.load * capacity)
    assert workload.arrival == cell.arrival


@pytest.mark.parametrize("name", NEW_CELLS)
def test_new_cells_are_not_family_draws(name, family):
    assert gen.off_family_reasons(gen.CELLS[name], family)


def test_off_family_reasons_name_what_training_cannot_draw(family):
    assert "32 replicas outside 2-16" in gen.off_family_reasons(gen.CELLS["conv_32xA100"], family)
    assert "3 GPU types in one cluster" in gen.off_family_reasons(gen.CELLS["conv_3gpu_93"],
                                                                  family)
    reasons = gen.off_family_reasons(gen.CELLS["longprompt_phases3x_2xA100_2xH100"], family)
    assert any("3 s phases" in r for r in reasons)
    assert any("log-normal medians" in r for r in reasons)


def _cell_of_draw(sampler: ScenarioSampler, rng: np.random.Generator) -> gen.Cell:
    """A family draw's lengths and arrivals as a :class:`Cell` (no capacity measured)."""
    lengths, _ = sampler._lengths(rng)
    arrivals, _ = sampler._arrivals(rng, 10.0)
    phases = arrivals.get("phases")
    return gen.Cell(("a100", "h100"), lengths, arrivals["arrival"], load=0.5,
                    cv=arrivals.get("cv", 1.0),
                    phase_s=phases[0].duration_s if phases else 0.0,
                    high_to_low=phases[0].qps / phases[1].qps if phases else 1.0)


def test_family_draws_have_no_off_family_reason(family):
    """The checker itself: what the family does draw is never called off-family."""
    sampler = ScenarioSampler(family)
    rng = np.random.default_rng(7)
    for _ in range(300):
        cell = _cell_of_draw(sampler, rng)
        assert gen.off_family_reasons(cell, family) == [], cell


# ----------------------------------------------------------------------------- statistics
def test_aim_verdicts_make_no_claim_when_the_interval_holds_the_bound():
    assert gen.aim_at_most(-0.03, -0.02, -0.015) == "met"
    assert gen.aim_at_most(-0.01, 0.01, -0.015) == "missed"
    assert gen.aim_at_most(-0.02, -0.01, -0.015) == "not shown"
    assert gen.aim_at_most(float("nan"), 0.0, 0.0) == "not shown"
    assert gen.aim_at_least(0.6, 0.9, 0.5) == "met"
    assert gen.aim_at_least(0.1, 0.4, 0.5) == "missed"
    assert gen.aim_at_least(0.4, 0.6, 0.5) == "not shown"
    assert gen.all_cells_verdict(["met", "met"]) == "met"
    assert gen.all_cells_verdict(["met", "not shown"]) == "not shown"
    assert gen.all_cells_verdict(["met", "missed", "not shown"]) == "missed"


def test_mean_over_cells_averages_cells_and_brackets_the_mean(rng):
    cells = [rng.normal(-0.02, 0.005, 10), rng.normal(0.01, 0.005, 12)]
    out = gen.mean_over_cells(cells)
    assert out["mean"] == pytest.approx(np.mean([c.mean() for c in cells]))
    assert out["low"] < out["mean"] < out["high"]
    assert out["cells"] == 2
    assert gen.mean_over_cells(cells) == out  # fixed resampling seed


def test_gap_closed_share_on_synthetic_numbers(rng):
    lookahead = [10.0 + rng.normal(0, 0.01, 10), 5.0 + rng.normal(0, 0.01, 10)]
    clairvoyant = [la * 0.9 for la in lookahead]
    noise = rng.normal(0, 0.01, 10)
    planner = [la * (0.95 + noise - noise.mean()) for la in lookahead]
    out = gen.gap_closed(lookahead, planner, clairvoyant)
    assert out["share"] == pytest.approx(0.5)
    assert out["low"] < 0.5 < out["high"]
    assert out["gap"] == pytest.approx(0.1)
    assert gen.aim_at_least(out["low"], out["high"], 0.5) == "not shown"
    better = gen.gap_closed(lookahead, [la * 0.92 for la in lookahead], clairvoyant)
    assert better["share"] == pytest.approx(0.8)
    assert gen.aim_at_least(better["low"], better["high"], 0.5) == "met"


def test_gap_closed_is_undefined_without_a_gap(rng):
    lookahead = [10.0 + rng.normal(0, 0.1, 10)]
    clairvoyant = [lookahead[0] + rng.normal(0, 0.1, 10)]
    out = gen.gap_closed(lookahead, [lookahead[0] * 0.99], clairvoyant)
    assert np.isnan(out["share"])
    assert gen.planner_verdicts({"gap_closed": out}) == {"gap_closed>=50%": "not shown"}


def _row(per_seed, best, lookahead):
    return {"e2e_mean_per_seed": per_seed, "best_per_seed": best,
            "lookahead_per_seed": lookahead, "ms_per_decision": 1.0,
            "vs_best": gen.comparison_dict(gen.compare_paired(per_seed, best))}


def test_policy_summary_and_verdicts_on_synthetic_cells(rng):
    base = [10.0 + rng.normal(0, 1, 10), 4.0 + rng.normal(0, 0.5, 10)]
    rows = {f"c{i}": {"p": _row(list(b * (0.97 + rng.normal(0, 0.001, 10))), list(b),
                                list(b * 0.975))}
            for i, b in enumerate(base)}
    summary = gen.router_summary(rows, "p")
    assert summary["vs_best"]["mean"] == pytest.approx(-0.03, abs=0.002)
    assert summary["vs_lookahead"]["mean"] == pytest.approx(-0.03 / 0.975 + 0.025 / 0.975,
                                                            abs=0.002)
    verdicts = gen.policy_verdicts(summary, list(r["p"] for r in rows.values()))
    assert verdicts == {"mean_vs_best<=-1.5%": "met", "every_cell_vs_best<=+0.5%": "met",
                        "mean_vs_lookahead<=+0.5%": "met"}


def test_table_words_only_where_the_interval_excludes_zero():
    same = gen.comparison_dict(gen.compare_paired([1.0, 1.1, 0.9], [1.0, 1.0, 1.0]))
    lower = gen.comparison_dict(gen.compare_paired([0.9, 0.91, 0.89], [1.0, 1.0, 1.0]))
    assert same["verdict"] == "no difference shown"
    assert lower["verdict"] == "better"
    row = {"seeds": 3, "requests": 10, "e2e_mean": 1.0, "e2e_p99": 2.0, "ms_per_decision": 0.1,
           "clip_share": float("nan"), "vs_best": same, "vs_lookahead": same}
    text = gen.cell_markdown("conv_8xA100", {"rows": {"x": row}, "off_family": [],
                                             "groups": []})
    assert "better" not in text and "worse" not in text
    assert "no difference shown" in text


# ----------------------------------------------------------------------------- end to end
def test_tiny_run_writes_the_table(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nprose\n\n{gen.MARK_BEGIN}\nold\n{gen.MARK_END}\n\nafter\n")
    out = tmp_path / "r.json"
    report = gen.main(["--cells", "longprompt_2xA100_2xH100", "--episodes", "2",
                       "--requests", "24", "--heuristics", "lor,least_added_time",
                       "--planner-seeds", "2", "--planner-requests", "8",
                       "--out", str(out), "--markdown", str(doc)])
    rows = report["cells"]["longprompt_2xA100_2xH100"]["rows"]
    assert set(rows) == {"lor", "least_added_time", "lookahead", gen.PLANNER, gen.CLAIRVOYANT}
    for row in rows.values():
        assert row["seeds"] == 2 and len(row["e2e_mean_per_seed"]) == 2
        assert row["vs_best"]["low"] <= row["vs_best"]["mean"] <= row["vs_best"]["high"]
    assert rows[gen.PLANNER]["requests"] == 8 and rows["lor"]["requests"] == 24
    assert set(report["summary"]) == {gen.PLANNER, gen.CLAIRVOYANT}
    assert "gap_closed" in report["summary"][gen.PLANNER]
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose\n\n" + gen.MARK_BEGIN)
    assert text.rstrip().endswith("after") and "old" not in text
    assert "| `least_added_time` | 2×24 |" in text
    assert str(tmp_path) not in text  # no machine paths in the document
    saved = json.loads(out.read_text())
    assert gen.report_markdown(saved) == gen.report_markdown(report)


def test_no_planner_beyond_the_replica_limit_nor_on_phases():
    report = gen.main(["--cells", "conv_32xA100,conv_phases3x_4xA100", "--episodes", "2",
                       "--requests", "12", "--heuristics", "lor,least_added_time",
                       "--no-lookahead", "--planner-seeds", "2", "--planner-requests", "6"])
    assert set(report["cells"]["conv_32xA100"]["rows"]) == {"lor", "least_added_time"}
    phases = report["cells"]["conv_phases3x_4xA100"]["rows"]
    assert gen.CLAIRVOYANT in phases and gen.PLANNER not in phases
    assert "vs_lookahead" not in phases["lor"]
