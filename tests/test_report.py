"""The report: one writer for family and one-scenario runs, its plots and its tables."""

from __future__ import annotations

import json
import re

import matplotlib
import numpy as np
import pytest

pytestmark = pytest.mark.train

from llm_cluster_env.tools.evaluation import RouterResult  # noqa: E402
from sb3_warmstart.pipeline import report  # noqa: E402
from sb3_warmstart.pipeline.report import HeldOutScenario, write_report  # noqa: E402

PLOTS = ("latency_cdf.png", "learning_curve.png", "dispatch_distribution.png")


def _result(name: str, scale: float, rng: np.random.Generator, episodes: int = 1
            ) -> RouterResult:
    result = RouterResult(name)
    for _ in range(episodes):
        e2e = scale * rng.lognormal(0.0, 0.4, 100)
        result.e2e.append(e2e)
        result.episodes.append({"e2e_mean": float(e2e.mean()),
                                "e2e_p99": float(np.quantile(e2e, 0.99)), "balance": 0.9})
    return result


def _scenario(label: str, scales: dict[str, float], rng, episodes: int = 1) -> HeldOutScenario:
    return HeldOutScenario(label, list(range(episodes)),
                           {n: _result(n, s, rng, episodes) for n, s in scales.items()})


def _history(episodes: int, rollouts: int = 4) -> list[dict]:
    rows = [{"kind": "episode", "num_timesteps": 64 * (i + 1), "episode_seed": 1000 + i,
             "e2e_mean": 2.0 + 0.01 * i} for i in range(episodes)]
    rows += [{"kind": "rollout", "num_timesteps": 256 * (i + 1), "balance": 0.8,
              "action_share_0": 0.5, "action_share_1": 0.5} for i in range(rollouts)]
    return rows


SCALES = {"ppo": 1.0, "bc_clone": 1.1, "lor": 1.2, "round_robin": 1.5}


def test_family_and_one_scenario_reports_have_every_file_and_the_same_keys(tmp_path, rng):
    family = [_scenario(f"scenario {i}", {n: s * (i + 1) for n, s in SCALES.items()}, rng)
              for i in range(3)]
    single = [_scenario("a100x4_conv_70", SCALES, rng, episodes=2)]
    summaries = {}
    for name, held_out in (("family", family), ("single", single)):
        summaries[name] = write_report(tmp_path / name, held_out, title=name,
                                       history=_history(8),
                                       lor_by_seed={1000 + i: 2.0 for i in range(8)})
        for file in ("results.txt", "results.csv", "results.json", "report.md", *PLOTS):
            assert (tmp_path / name / file).stat().st_size > 0, (name, file)
        text = (tmp_path / name / "report.md").read_text()
        assert all(f"![{p}]({p})" in text for p in PLOTS)
    assert summaries["family"].keys() == summaries["single"].keys()
    assert len(summaries["family"]["scenarios"]) == 3 and len(summaries["single"]["scenarios"]) == 1
    # the one-row case: the geometric means are the scenario's own ratios, exactly
    results = single[0].results
    ppo, lor = results["ppo"], results["lor"]
    comparison = summaries["single"]["comparison"]
    assert comparison["ppo_vs_lor"] == ppo.mean("e2e_mean") / lor.mean("e2e_mean") - 1.0
    assert comparison["ppo_p99_vs_lor"] == ppo.mean("e2e_p99") / lor.mean("e2e_p99") - 1.0
    assert comparison["best_heuristic"] == "lor"
    # across scenarios: the geometric mean of the per-scenario ratios
    ratios = [s.results["ppo"].mean("e2e_mean") / s.results["lor"].mean("e2e_mean")
              for s in family]
    assert summaries["family"]["ppo"]["vs_lor_mean"] == pytest.approx(
        np.exp(np.mean(np.log(ratios))) - 1.0, rel=1e-12)
    saved = json.loads((tmp_path / "family" / "results.json").read_text())
    assert saved["routers"]["ppo"]["e2e_mean"] == pytest.approx(
        np.mean([s.results["ppo"].mean("e2e_mean") for s in family]))


def test_a_router_mapping_is_the_one_scenario_case(tmp_path, rng):
    results = {n: _result(n, s, rng, episodes=2) for n, s in SCALES.items()}
    summary = write_report(tmp_path, results, title="a100x4_conv_70")
    assert [row["label"] for row in summary["scenarios"]] == ["a100x4_conv_70"]
    assert summary["routers"]["ppo"]["e2e_mean"] == results["ppo"].mean("e2e_mean")
    assert (tmp_path / "latency_cdf.png").is_file()
    assert not (tmp_path / "learning_curve.png").exists()  # no history, no curve


def _is_grey(color) -> bool:
    r, g, b = matplotlib.colors.to_rgb(color)
    return max(r, g, b) - min(r, g, b) < 1e-9


def test_latency_cdf_emphasises_the_learned_router_and_the_three_best_heuristics(tmp_path, rng):
    # 16 heuristics, h00 best ... h15 worst, listed in scrambled order, and the learned router
    names = [f"h{i:02d}" for i in rng.permutation(16)]
    results = {"ppo": _result("ppo", 1.0, rng)}
    results.update({n: _result(n, 1.0 + 0.1 * int(n[1:]), rng) for n in names})
    held_out = [HeldOutScenario("s", [0], results)]
    ranked = report.rank_heuristics(held_out, names)
    assert ranked[:3] == ["h00", "h01", "h02"]
    fig = report.plot_emphasised_cdf(results, tmp_path / "cdf.png",
                                  emphasised=["ppo", *ranked[:3]])
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert len(lines) == 17
    front = ["ppo", "h00", "h01", "h02"]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:4] == front
    colors = [matplotlib.colors.to_rgb(lines[n].get_color()) for n in front]
    assert len(set(colors)) == 4 and not any(_is_grey(c) for c in colors)
    assert lines["ppo"].get_linewidth() >= 2.5
    assert min(lines[n].get_linewidth() for n in front) >= 2.0
    rest = [line for name, line in lines.items() if name not in front]
    assert all(_is_grey(line.get_color()) and line.get_linewidth() <= 1.0 for line in rest)
    assert min(line.get_zorder() for line in map(lines.get, front)) > max(
        line.get_zorder() for line in rest)  # drawn on top


def _captured_figures(monkeypatch) -> list:
    figures = []
    plt = report._pyplot()
    close = plt.close

    def keep(fig=None):
        figures.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return figures


def test_learning_curve_states_how_many_training_episodes_it_shows(tmp_path, monkeypatch):
    history = _history(192)
    seeds = report.paired_episode_seeds(history)
    assert len(seeds) == 48
    figures = _captured_figures(monkeypatch)
    summary = write_report(tmp_path, [_scenario("s", SCALES, np.random.default_rng(0))],
                           title="t", history=history, lor_by_seed={s: 2.0 for s in seeds})
    assert (summary["curve_episodes_shown"], summary["curve_episodes_total"]) == (48, 192)
    curve = next(f for f in figures if "learning curve" in f.axes[0].get_title())
    ax = curve.axes[0]
    shown = "48 of 192 training episodes"
    assert shown in " ".join(ax.get_title().split())
    assert any(shown in t.get_text() for t in ax.get_legend().get_texts())
    points = next(line for line in ax.get_lines() if shown in line.get_label())
    assert len(points.get_xdata()) == 48  # one point per paired episode (each its own step)
    assert shown in (tmp_path / "report.md").read_text()
    # without lor pairs every episode is drawn, and the figure says so
    figures.clear()
    report.plot_learning_curve([r for r in history if r["kind"] == "episode"],
                               tmp_path / "abs.png")
    assert "all 192 training episodes" in figures[0].axes[0].get_title()


def test_results_table_keeps_long_scenario_names_whole(tmp_path, rng):
    long_label = ("2xa100+2xh100+4xl40s+1xa40 lognormal(p~2048, o~412, s0.85) "
                  "gamma(cv 3.10) load 0.93 with a long tail of words")
    held_out = [_scenario(long_label, SCALES, rng), _scenario("short", SCALES, rng)]
    write_report(tmp_path, held_out, title="family")
    text = (tmp_path / "results.txt").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("2xa100"))
    column = [lines[start][:report.SCENARIO_COLUMN]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        column.append(line.strip())
    assert re.sub(r"\s", "", "".join(column)) == re.sub(r"\s", "", long_label)
    assert len(long_label) > report.SCENARIO_COLUMN  # it did have to wrap
    assert all(len(line) <= len(lines[0]) for line in lines[:start + 3])
