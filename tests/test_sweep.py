"""``train/sweep.py``: trials are built and validated before Ray starts (an unknown
hyperparameter fails naming it), the report lists every trial; with Ray installed
(``make test-ray``), two tiny trials run at once on 2 CPUs and the report gathers both tables."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None


def _sweep():
    name = "train_sweep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "train" / "sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("args, message", [
    (["--grid", "ppo.learning_rat=0.0001,0.0003"], "ppo.learning_rat: unknown key"),
    (["--grid", "ppo.learning_rate=0.0003,-1"], "ppo.learning_rate=-1.0: must be > 0"),
    (["--grid", "warm_start.demo_stepz=[1, 2]"], "warm_start.demo_stepz: unknown key"),
    (["--set", "kl.nope=1"], "kl.nope: unknown key"),
    (["--seeds", "0,x"], "--seeds='0,x': expected comma-separated integers"),
    (["--grid", "seed=1,2"], "use --seeds"),
    (["--grid", "ppo.n_epochs"], "expected KEY=V1,V2"),
    (["--seeds", "0,1,0"], "--seeds='0,1,0': seed 0 repeated"),
    (["--seeds", "3,3"], "--seeds='3,3': seed 3 repeated"),
    (["--grid", "ppo.learning_rate=1e-4,0.0003,0.0001"], "ppo.learning_rate=0.0001 repeated"),
    (["--grid", "ppo.net_arch=[[32], [64], [32]]"], "ppo.net_arch=[32] repeated"),
    (["--grid", "ppo.n_epochs=2,3", "--grid", "kl.kl_ref_coef_initial=0.5,0.5"],
     "kl.kl_ref_coef_initial=0.5 repeated"),
])
def test_bad_sweep_fails_naming_the_key_before_any_trial(args, message, tmp_path, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        _sweep().main([*args, "--output-dir", str(out)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing started, nothing written
    assert "ray" not in sys.modules or not HAVE_RAY or not sys.modules["ray"].is_initialized()


def test_repeated_values_are_refused_before_trials_are_built():
    sweep = _sweep()
    with pytest.raises(sweep.ConfigError, match=r"--seeds='0,0': seed 0 repeated"):
        sweep.parse_grid([], "0,0")
    with pytest.raises(sweep.ConfigError, match=r"ppo.n_epochs=2.0 repeated"):
        sweep.parse_grid(["ppo.n_epochs=2,2.0"], "0")
    axes = sweep.parse_grid(["ppo.n_epochs=2,3"], "0,1")
    assert axes == [("seed", [0, 1]), ("ppo.n_epochs", [2, 3])]


def test_a_sweep_without_ray_exits_2_naming_the_extra_before_anything_runs(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ModuleNotFoundError
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        _sweep().main(["--seeds", "0", "--set", "total_requests=1024", "--output-dir",
                       str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("train/sweep.py: error: Ray Tune is not installed")
    assert "ray extra" in err[0] and "make test-ray" in err[0] and ".[ray]" in err[0]
    assert not out.exists()


def test_trials_are_every_combination_with_validated_configs(capsys):
    summary = _sweep().main(["--seeds", "0,1", "--grid", "ppo.learning_rate=1e-4,0.0003",
                             "--grid", "ppo.net_arch=[[32], [64, 64]]", "--set",
                             "total_requests=1024", "--dry-run"])
    names = summary["trials"]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[0] == "trial-00-seed=0-learning_rate=0.0001-net_arch=_32_"
    sweep = _sweep()
    trials = sweep.build_trials(None, "default", sweep.parse_grid(
        ["ppo.learning_rate=1e-4,0.0003"], "3"), {"total_requests": 1024})
    assert [t.config.ppo.learning_rate for t in trials] == [1e-4, 3e-4]
    assert all(t.config.seed == 3 and t.config.total_requests == 1024 for t in trials)


def test_a_family_run_fills_the_sweep_row_from_its_held_out_scenarios():
    # the shape report.build_report returns for a run evaluated on two held-out scenarios
    summary = {"scenarios": [
        {"seed": 0, "lor_e2e": 4.0, "best_heuristic": "lor", "best_e2e": 4.0,
         "ppo": {"e2e": 4.2, "vs_lor": 0.05, "vs_best": 0.05, "balance": 0.9}},
        {"seed": 1, "lor_e2e": 8.0, "best_heuristic": "least_added_time", "best_e2e": 7.5,
         "ppo": {"e2e": 7.8, "vs_lor": -0.025, "vs_best": 0.04, "balance": 0.8}}],
        "ppo": {"vs_lor_mean": 0.012, "vs_best_mean": 0.045, "vs_best_worst": 0.05},
        "comparison": {"best_heuristic": "least_added_time/lor", "ppo_vs_best_heuristic": 0.045,
                       "ppo_vs_lor": 0.012, "ppo_p99_vs_lor": 0.02},
        "table": "scenario ..."}
    row = _sweep().result_row(summary)
    assert row["ppo_e2e_mean"] == pytest.approx(6.0) and row["lor_e2e_mean"] == 6.0
    assert row["ppo_vs_lor"] == 0.012 and row["ppo_vs_best_heuristic"] == 0.045
    assert row["best_heuristic"] == "least_added_time/lor"
    assert row["ppo_balance"] == pytest.approx(0.85) and row["ppo_p99_vs_lor"] == 0.02


def test_a_one_scenario_run_is_the_one_row_case_and_keeps_its_p99_column():
    summary = {"scenarios": [
        {"seed": 0, "lor_e2e": 5.0, "best_heuristic": "least_added_time", "best_e2e": 4.9,
         "ppo": {"e2e": 4.95, "vs_lor": -0.01, "vs_best": 0.0102, "balance": 0.97}}],
        "comparison": {"best_heuristic": "least_added_time", "ppo_vs_best_heuristic": 0.0102,
                       "ppo_vs_lor": -0.01, "ppo_p99_vs_lor": -0.03}}
    row = _sweep().result_row(summary)
    assert row["ppo_e2e_mean"] == 4.95 and row["lor_e2e_mean"] == 5.0
    assert row["ppo_p99_vs_lor"] == -0.03 and row["ppo_balance"] == 0.97


def test_report_lists_every_trial_failed_ones_with_their_error(tmp_path):
    sweep = _sweep()
    trials = sweep.build_trials(None, "default", sweep.parse_grid([], "0,1,2"), {})
    rows = {
        trials[0].name: {"status": "ok", "ppo_e2e_mean": 5.0, "lor_e2e_mean": 5.1,
                         "ppo_vs_lor": 5.0 / 5.1 - 1, "start_time": 0.0, "end_time": 10.0,
                         "table": "router  E2E\nppo  5.0"},
        trials[1].name: {"status": "ok", "ppo_e2e_mean": 5.2, "lor_e2e_mean": 5.1,
                         "start_time": 2.0, "end_time": 12.0, "table": "router  E2E\nppo  5.2"},
        trials[2].name: {"status": "error: RuntimeError: boom"},
    }
    summary = sweep.write_report(tmp_path, trials, rows)
    assert summary["total"] == 3 and summary["finished"] == 2
    assert summary["max_concurrent_trials"] == 2
    report = (tmp_path / "sweep_report.md").read_text()
    for trial in trials:
        assert trial.name in report
    assert "error: RuntimeError: boom" in report and "ppo  5.2" in report
    csv_lines = (tmp_path / "sweep_results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("trial,seed,status")


def test_an_earlier_report_of_other_trials_is_moved_aside_not_overwritten(tmp_path):
    sweep = _sweep()
    first = sweep.build_trials(None, "default", sweep.parse_grid([], "0,1"), {})
    sweep.write_report(tmp_path, first, {})
    earlier = (tmp_path / "sweep_report.md").read_text()
    sweep.write_report(tmp_path, first, {})  # the same sweep again: updated in place
    assert not list(tmp_path.glob("previous-*"))
    other = sweep.build_trials(None, "default", sweep.parse_grid([], "5"), {})
    sweep.write_report(tmp_path, other, {})
    (moved,) = tmp_path.glob("previous-*")
    assert (moved / "sweep_report.md").read_text() == earlier
    assert other[0].name in (tmp_path / "sweep_report.md").read_text()


def test_max_concurrency_counts_overlapping_trials():
    sweep = _sweep()
    rows = [{"start_time": 0, "end_time": 5}, {"start_time": 1, "end_time": 3},
            {"start_time": 3, "end_time": 4}, {"start_time": 5, "end_time": 6}]
    assert sweep.max_concurrency(rows) == 2  # an end and a start at the same instant: no overlap


TINY = ["--set", "total_requests=512", "--set", "warm_start.demo_steps=512",
        "--set", "bc.epochs=2", "--set", "warm_start.demo_episode_requests=64",
        "--set", "env_kwargs.episode_requests=64", "--set", "evaluation.episodes=1",
        "--set", "evaluation.episode_requests=80", "--set", "evaluation.routers=[lor, round_robin]",
        "--set", "stabilization.stabilization_steps=128", "--set", "ppo.n_steps=64",
        "--set", "ppo.batch_size=64", "--set", "ppo.n_envs=2", "--set", "ppo.lstm_hidden_size=16",
        "--set", "ppo.net_arch=[16]"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (make test-ray)")
def test_two_trials_run_concurrently_on_two_cpus_and_the_report_lists_both(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train" / "sweep.py"), "--seeds", "0,1",
         "--num-cpus", "2", "--output-dir", str(out), *TINY],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "sweep_results.json").read_text())
    assert summary["total"] == 2 and summary["finished"] == 2, summary
    assert summary["max_concurrent_trials"] == 2
    report = (out / "sweep_report.md").read_text()
    for row in summary["trials"]:
        assert row["status"] == "ok" and row["ppo_e2e_mean"] > 0
        assert row["ppo_vs_lor"] is not None and row["best_heuristic"]
        assert (out / row["trial"] / "report" / "results.txt").is_file()
        table = (out / row["trial"] / "report" / "results.txt").read_text().strip()
        assert table in report  # each trial's final table, gathered
        assert (out / row["trial"] / "final_model.zip").is_file()
    # every trial trained with its own seed in its own folder
    seeds = {json.loads((out / r["trial"] / "run.json").read_text())["training"]["seed"]
             for r in summary["trials"]}
    assert seeds == {0, 1}
