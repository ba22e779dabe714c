"""benchmarks/training_seeds.py: two configurations compared over training seeds from grid
JSONs: the pooled paired difference, its verdict rule, and the refusals of grids that served
other episodes or other best heuristics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import training_seeds as ts

BEST = {"cell_a": [10.0, 12.0, 11.0, 9.0], "cell_b": [5.0, 6.0, 5.5, 4.5]}
LOOKAHEAD = {"cell_a": [9.9, 11.9, 10.8, 9.1], "cell_b": [5.1, 5.9, 5.4, 4.6]}
SETTINGS = {"seed": 50_000, "episodes": 4, "requests": 1500}


def grid(tmp_path, name, runs, *, settings=SETTINGS, best=BEST, lookahead=True):
    """A grid JSON with a ``<kind>:<run>`` row per run of ``runs`` (run -> factor on the best
    heuristic's per-seed mean E2E, or a per-cell mapping of factors)."""
    cells = {}
    for cell, per_seed in best.items():
        rows = {}
        for run, factor in runs.items():
            f = factor[cell] if isinstance(factor, dict) else factor
            for kind in ("bc", "distilled", "ppo"):
                rows[f"{kind}:{run}"] = {
                    "e2e_mean_per_seed": (np.asarray(per_seed) * np.asarray(f)).tolist(),
                    "best_per_seed": list(per_seed)}
        if lookahead:
            rows["lookahead"] = {"e2e_mean_per_seed": LOOKAHEAD[cell]}
        cells[cell] = {"rows": rows}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"settings": settings, "cells": cells}))
    return str(path)


def test_a_configuration_better_on_every_training_seed_is_better(tmp_path):
    a = grid(tmp_path, "a", {"a0": 0.99, "a1": 0.995})
    b = grid(tmp_path, "b", {"b0": 1.0, "b1": 1.0}, lookahead=False)
    result = ts.main(["--a", f"{a}#a0", "--a", f"{a}#a1", "--b", f"{b}#b0", "--b", f"{b}#b1",
                      "--kinds", "distilled"])
    r = result["distilled"]
    assert r["cells"] == ["cell_a", "cell_b"]
    # per training seed: exactly the factor; pooled: their mean; interval around it
    assert [p["mean"] for p in r["a_vs_b_per_training_seed"]] == pytest.approx([-0.01, -0.005])
    assert r["a_vs_b"]["mean"] == pytest.approx(-0.0075)
    assert r["a_vs_b"]["verdict"] == "better"
    assert r["a"]["vs_best"]["mean"] == pytest.approx(-0.0075)
    assert r["b"]["vs_best"]["mean"] == pytest.approx(0.0)
    # vs lookahead, from the grid that has its row: mean over cells of the mean relative diff
    expected = np.mean([np.mean((np.asarray(BEST[c]) * 0.9925) / np.asarray(LOOKAHEAD[c]) - 1)
                        for c in BEST])
    assert r["a"]["vs_lookahead"]["mean"] == pytest.approx(expected, rel=1e-9)


def test_training_seeds_that_disagree_show_nothing(tmp_path):
    """Pooled, A is 0.5% worse with a tight interval (conditional on the seeds), but one
    training seed is better: no verdict."""
    a = grid(tmp_path, "a", {"a0": 0.995, "a1": 1.015})
    b = grid(tmp_path, "b", {"b0": 1.0, "b1": 1.0})
    r = ts.compare([ts.RunRows.parse(f"{a}#a0", "--a"), ts.RunRows.parse(f"{a}#a1", "--a")],
                   [ts.RunRows.parse(f"{b}#b0", "--b"), ts.RunRows.parse(f"{b}#b1", "--b")])
    pooled = r["ppo"]["a_vs_b"]
    assert pooled["low"] > 0 and pooled["verdict"] == "not shown"


def test_worst_cell_is_the_mean_over_training_seeds(tmp_path):
    a = grid(tmp_path, "a", {"a0": {"cell_a": 1.02, "cell_b": 1.0},
                             "a1": {"cell_a": 1.0, "cell_b": 1.03}})
    b = grid(tmp_path, "b", {"b0": 1.0, "b1": 1.0})
    r = ts.compare([ts.RunRows.parse(f"{a}#a{i}", "--a") for i in range(2)],
                   [ts.RunRows.parse(f"{b}#b{i}", "--b") for i in range(2)], ["bc"])
    assert r["bc"]["a"]["worst_cell"] == "cell_b"
    assert r["bc"]["a"]["worst_vs_best"] == pytest.approx(0.015)
    assert r["bc"]["a_vs_b_per_cell"] == pytest.approx({"cell_a": 0.01, "cell_b": 0.015})


def test_markdown_block_and_json_are_written(tmp_path):
    a = grid(tmp_path, "a", {"a0": 0.99})
    b = grid(tmp_path, "b", {"b0": 1.0})
    doc = tmp_path / "doc.md"
    begin, end = ts.markers("alt")
    doc.write_text(f"# prose\n\n{begin}\nold\n{end}\n\nafter\n")
    ts.main(["--a", f"{a}#a0", "--b", f"{b}#b0", "--a-name", "alternatives",
             "--out", str(tmp_path / "out.json"), "--markdown", str(doc), "--block", "alt"])
    text = doc.read_text()
    assert text.startswith("# prose") and text.endswith("after\n") and "old" not in text
    assert "alternatives `ppo` vs B `ppo`, paired: -1.00%" in text and "**better**" in text
    stored = json.loads((tmp_path / "out.json").read_text())
    assert stored["kinds"]["ppo"]["a_vs_b"]["verdict"] == "better"


def test_versus_compares_ppo_with_its_own_start_by_workload_group(tmp_path):
    """``--versus distilled``: each run's PPO row against the same run's distilled row; the
    workload groups are the cells' first words."""
    best = {"arxiv_x": BEST["cell_a"], "conv_y": BEST["cell_b"], "conv_z": BEST["cell_b"]}
    path = grid(tmp_path, "g", {"r0": 1.0, "r1": 1.0}, best=best, lookahead=False)
    data = json.loads(open(path).read())
    ppo_factor = {"arxiv_x": 1.01, "conv_y": 0.98, "conv_z": 0.99}
    for cell, factor in ppo_factor.items():
        for run in ("r0", "r1"):
            row = data["cells"][cell]["rows"][f"ppo:{run}"]
            row["e2e_mean_per_seed"] = [x * factor for x in row["e2e_mean_per_seed"]]
    open(path, "w").write(json.dumps(data))
    result = ts.main(["--a", f"{path}#r0", "--a", f"{path}#r1", "--b", f"{path}#r0",
                      "--b", f"{path}#r1", "--kinds", "ppo", "--versus", "distilled"])
    r = result["ppo"]
    assert r["versus"] == "distilled"
    assert r["a_vs_b"]["mean"] == pytest.approx((0.01 - 0.02 - 0.01) / 3)
    groups = r["a_vs_b_by_group"]
    assert groups["arxiv"]["mean"] == pytest.approx(0.01) and groups["arxiv"]["verdict"] == "worse"
    assert groups["conv"]["mean"] == pytest.approx(-0.015) and groups["conv"]["cells"] == 2
    assert groups["conv"]["verdict"] == "better"


@pytest.mark.parametrize("case, message", [
    ("no_hash", "--a='{a}': expected GRID.json#RUN"),
    ("missing_run", "no row '<kind>:nobody'"),
    ("other_seed", "settings.seed: 50000 in"),
    ("other_best", "cell cell_a: the grids disagree on its best heuristic"),
    ("unpaired", "--a/--b: 2 and 1 runs"),
])
def test_bad_input_is_refused_naming_it(tmp_path, case, message):
    a = grid(tmp_path, "a", {"a0": 0.99, "a1": 0.99})
    b = grid(tmp_path, "b", {"b0": 1.0})
    argv = {"no_hash": ["--a", a, "--b", f"{b}#b0"],
            "missing_run": ["--a", f"{a}#nobody", "--b", f"{b}#b0"],
            "other_seed": ["--a", f"{a}#a0", "--b",
                           grid(tmp_path, "c", {"b0": 1.0},
                                settings={**SETTINGS, "seed": 1}) + "#b0"],
            "other_best": ["--a", f"{a}#a0", "--b",
                           grid(tmp_path, "d", {"b0": 1.0},
                                best={**BEST, "cell_a": [10.0, 12.0, 11.0, 9.5]}) + "#b0"],
            "unpaired": ["--a", f"{a}#a0", "--a", f"{a}#a1", "--b", f"{b}#b0"]}[case]
    with pytest.raises(SystemExit, match=message.format(a=a).replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        ts.main(argv)
