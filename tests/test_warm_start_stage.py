"""The warm-start stages alone: demonstrations reused when their settings match (family sets
included), and the demo and BC scalars in the run's TensorBoard folder."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytestmark = pytest.mark.train

pytest.importorskip("imitation")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from sb3_warmstart.pipeline import warm_start_stage  # noqa: E402
from sb3_warmstart.pipeline.config import load_config  # noqa: E402
from sb3_warmstart.warmstart import demo_collect, family_demos  # noqa: E402

TINY_WARM_START = {"demo_steps": 48, "demo_episode_requests": 16,
                   "demo_candidates": ["lor", "round_robin"]}
FAMILY = {"warm_start": TINY_WARM_START, "bc": {"epochs": 2, "batch_size": 2},
          "family_overrides": {"replicas": [2, 4], "replica_slots": 5, "episode_requests": 16,
                               "capacity_requests": 100}}
SCENARIO = {"family": None, "env_kwargs": {"episode_requests": 16},
            "warm_start": {**TINY_WARM_START, "demo_policies": {"lor": 1.0, "random": 1.0},
                           "demo_steps": 64}}


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _refuse(*args, **kwargs):
    raise AssertionError("collected again although the stored demonstrations fit")


@pytest.mark.parametrize(("overrides", "collector"), [
    (FAMILY, (family_demos, "collect_best_heuristic_demonstrations")),
    (SCENARIO, (demo_collect, "collect_demonstrations")),
], ids=["family", "scenario"])
def test_demonstrations_are_reused_when_their_settings_match(
        overrides, collector, tmp_path, monkeypatch, caplog):
    config = load_config(None, overrides=overrides)
    trajectories, stats = warm_start_stage.demonstrations(config, tmp_path, progress=False)
    monkeypatch.setattr(*collector, _refuse)
    with caplog.at_level(logging.INFO, logger="sb3_warmstart"):
        again, again_stats = warm_start_stage.demonstrations(config, tmp_path, progress=False)
    assert "demos: reusing" in caplog.text and "unusable" not in caplog.text
    assert len(again) == len(trajectories) and again_stats["pipeline_settings"] == \
        stats["pipeline_settings"]
    assert all(np.array_equal(a.acts, b.acts) and np.array_equal(a.obs, b.obs)
               for a, b in zip(trajectories, again))
    monkeypatch.undo()
    other = load_config(None, overrides={**overrides, "seed": 1})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sb3_warmstart"):
        warm_start_stage.demonstrations(other, tmp_path, progress=False)
    assert "has other settings; collecting again" in caplog.text


def test_demo_and_bc_scalars_are_logged_to_tensorboard(tmp_path):
    config = load_config(None, overrides=FAMILY)
    trajectories, stats = warm_start_stage.demonstrations(config, tmp_path, progress=False)
    demos = _scalars(tmp_path / "tensorboard" / "demos")
    experts = stats["trajectory_policies"]
    assert demos["demos/total_episodes"] == [(0, len(trajectories))]
    assert demos["demos/total_steps"] == [(0, stats["total_steps"])]
    for name in set(experts):
        mine = [t for t, e in zip(trajectories, experts) if e == name]
        returns = [float(t.rews.sum()) for t in mine]
        assert demos[f"demos/{name}/episodes"] == [(0, len(mine))]
        assert demos[f"demos/{name}/steps"] == [(0, sum(len(t.acts) for t in mine))]
        assert demos[f"demos/{name}/mean_return"][0][1] == pytest.approx(np.mean(returns),
                                                                         rel=1e-6)
        assert demos[f"demos/{name}/mean_reward"][0][1] == pytest.approx(
            sum(returns) / sum(len(t.acts) for t in mine), rel=1e-6)

    pretrained = warm_start_stage.clone(config, tmp_path, trajectories, stats, progress=False)
    bc = _scalars(tmp_path / "tensorboard" / "bc")
    assert {"bc/loss", "bc/accuracy", "bc/neglogp", "bc/learning_rate", "bc/val_accuracy",
            "bc/val_nll"} <= set(bc)
    assert [step for step, _ in bc["bc/loss"]] == [1, 2]  # one point per epoch
    assert bc["bc/val_accuracy"][-1][1] == pytest.approx(pretrained.summary["val_accuracy"],
                                                         rel=1e-6)
    # redoing the stages (here: reusing both) leaves one curve, not two
    again, again_stats = warm_start_stage.demonstrations(config, tmp_path, progress=False)
    warm_start_stage.clone(config, tmp_path, again, again_stats, progress=False)
    assert _scalars(tmp_path / "tensorboard" / "demos") == demos
    assert _scalars(tmp_path / "tensorboard" / "bc") == bc
