"""benchmarks/clairvoyance.py: its rows differ only in what they know, its summary splits the
clairvoyant gap, and a tiny run writes its tables between its markers."""

from __future__ import annotations

import json

import pytest

from benchmarks import clairvoyance as cv


def test_planner_rows_differ_only_in_what_they_know():
    arrivals, both = cv.ROWS[cv.ARRIVALS]().config, cv.ROWS[cv.BOTH]().config
    assert arrivals.clairvoyant and both.clairvoyant
    assert both.clairvoyant_lengths and not arrivals.clairvoyant_lengths
    assert arrivals.lengths == "expected"
    for key in ("horizon_s", "candidates", "assignment", "base", "objective"):
        assert getattr(arrivals, key) == getattr(both, key)
    assert cv.ROWS[cv.ORACLE]().oracle


def test_the_sampled_planner_is_left_out_where_it_cannot_sample():
    assert "rollout_planner" not in cv.cell_rows("conv_phases3x_4xA100", list(cv.ROWS))
    assert "rollout_planner" in cv.cell_rows("conv_8xA100", list(cv.ROWS))


@pytest.mark.parametrize("argv, message", [
    (["--rows", "oracle"], "--rows: unknown"),
    (["--cells", "mars"], "--cells: unknown"),
    (["--episodes", "1"], "--episodes=1"),
    (["--heuristics", "fastest"], "--heuristics: unknown"),
])
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        cv.parse_args(argv)
    assert message in capsys.readouterr().err


def test_summary_shares_on_synthetic_cells():
    """Lengths alone close a quarter, arrivals alone three quarters of a 2% gap."""
    def row(values):
        return {"e2e_mean_per_seed": values, "best_per_seed": [10.0, 10.0, 10.0],
                "lookahead_per_seed": [10.0, 10.0, 10.0], "ms_per_decision": 1.0}
    cell = {"rows": {"lookahead": row([10.0, 10.0, 10.0]),
                     cv.ORACLE: row([9.94, 9.95, 9.96]),
                     cv.ARRIVALS: row([9.84, 9.85, 9.86]),
                     cv.BOTH: row([9.79, 9.80, 9.81])}}
    summary = cv.summarise({"a": cell, "b": cell}, list(cv.DEFAULT_ROWS))
    assert summary["rows"][cv.BOTH]["vs_lookahead"]["mean"] == pytest.approx(-0.02)
    shares = summary["shares"][cv.BOTH]
    assert shares[cv.ORACLE]["share"] == pytest.approx(0.25)
    assert shares[cv.ARRIVALS]["share"] == pytest.approx(0.75)
    assert shares[cv.ORACLE]["gap"] == pytest.approx(0.02)
    assert shares[cv.ORACLE]["cells"] == 2
    assert set(summary["shares"]) == {cv.BOTH}  # no other bound ran
    assert summary["better_rule_per_cell"]["mean"] == pytest.approx(0.0)  # lookahead = best


def test_better_rule_per_cell_takes_lookahead_only_where_it_wins():
    def cell(lookahead):
        return {"rows": {"lookahead": {"e2e_mean_per_seed": lookahead, "ms_per_decision": 1.0,
                                       "best_per_seed": [10.0, 10.0],
                                       "lookahead_per_seed": lookahead}}}
    cells = {"wins": cell([9.8, 9.8]), "loses": cell([10.4, 10.4])}
    summary = cv.summarise(cells, [])
    assert summary["better_rule_per_cell"]["mean"] == pytest.approx(-0.01)
    assert summary["rows"]["lookahead"]["vs_best"]["mean"] == pytest.approx(0.01)


def test_tiny_run_writes_the_table_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    main_begin, main_end = cv.markers("main")
    other = "\n".join(cv.markers("reroute"))
    doc.write_text(f"prose before\n{main_begin}\nold\n{main_end}\nmiddle\n{other}\nprose after\n")
    out = tmp_path / "c.json"
    report = cv.main(["--episodes", "2", "--requests", "40", "--cells", "conv_2xA40_2xH100",
                      "--heuristics", "least_added_time,lor", "--out", str(out),
                      "--markdown", str(doc)])
    rows = report["cells"]["conv_2xA40_2xH100"]["rows"]
    assert set(rows) == {"lookahead", *cv.DEFAULT_ROWS}
    assert report["cells"]["conv_2xA40_2xH100"]["best_heuristic"] in {"least_added_time", "lor"}
    for r in rows.values():
        assert len(r["e2e_mean_per_seed"]) == 2 and r["e2e_mean"] > 0
    text = doc.read_text()
    assert text.startswith("prose before\n") and text.endswith(f"middle\n{other}\nprose after\n")
    assert "old" not in text and "`clairvoyant_arrivals`" in text
    again = cv.main(["--from-json", str(out)])
    assert again["summary"] == json.loads(out.read_text())["summary"]
