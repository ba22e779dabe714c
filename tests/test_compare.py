"""The router-comparison CLI (the main job until training exists): output files and table."""

from __future__ import annotations

import csv
import json

import pytest

from llm_cluster_env.tools.compare import main, parse_args


@pytest.mark.slow
def test_compare_writes_table_csv_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["--scenario", "heterogeneous", "--routers", "lor,round_robin,least_work_time",
                 "--episodes", "1", "--requests", "300", "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "E2E mean s" in out and "least_work_time" in out and "vs lor" in out
    folder = tmp_path / "heterogeneous"
    summary = json.loads((folder / "results.json").read_text())
    assert set(summary) == {"lor", "round_robin", "least_work_time"}
    assert summary["lor"]["num_requests"] == 300
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["router"] for r in rows] == ["lor", "round_robin", "least_work_time"]
    assert float(rows[0]["e2e_mean"]) == pytest.approx(summary["lor"]["e2e_mean"])
    assert (folder / "latency_cdf.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--routers", "lor,fastest"], "unknown router 'fastest'"),
    (["--episodes", "0"], "--episodes=0"),
    (["--requests", "-5"], "--requests=-5"),
    (["--scenario", "nope"], "scenario='nope': unknown scenario"),
    (["--seed", "-1"], "--seed=-1: must be >= 0"),
])
def test_compare_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
