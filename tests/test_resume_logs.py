"""Logs survive resumes: a run killed with SIGKILL (or stopped with Ctrl-C) mid-PPO and run
again ends with the rows of an uninterrupted run -- none lost, none repeated."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.train, pytest.mark.slow]

from conftest import load_script  # noqa: E402

warmstart = load_script("warmstart")
REPO_ROOT = Path(__file__).resolve().parents[1]
#: A tiny run whose PPO has 8 rollouts of 128 steps and a checkpoint after each.
ARGS = [
    "--ppo-requests", "1024", "--demo-steps", "256", "--bc-epochs", "1", "--no-progress",
    "--set", "warm_start.demo_episode_requests=64", "--set", "env_kwargs.episode_requests=48",
    "--set", "evaluation.episodes=1", "--set", "evaluation.episode_requests=40",
    "--set", "evaluation.routers=[lor]", "--set", "stabilization.stabilization_steps=128",
    "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=64", "--set", "ppo.n_envs=2",
    "--set", "ppo.lstm_hidden_size=8", "--set", "ppo.net_arch=[8]",
    "--set", "checkpointing.checkpoint_interval=128", "--set", "kl.kl_ref_decay_steps=10",
    "--set", "dagger.enabled=false",  # the DAgger stage: tests/test_pipeline_dagger.py
]
#: Wall-clock columns: they differ between any two runs.
WALL_CLOCK = {"time/fps", "time/time_elapsed"}


def progress_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "progress.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK}
                for row in csv.DictReader(f)]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar as ``(step, value)`` pairs, after TensorBoard's own purge of
    events a restarted writer superseded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag not in WALL_CLOCK}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    warmstart.main([*ARGS, "--output-dir", str(out)])
    return out


def start_child(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train" / "warmstart.py"), *ARGS, "--output-dir",
         str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, steps: int) -> int:
    """Block until the child's latest checkpoint is at >= ``steps`` env steps (mid-PPO)."""
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            step = json.loads(latest.read_text())["num_timesteps"]
        except (OSError, ValueError, KeyError):
            step = -1
        if step >= steps:
            return step
        time.sleep(0.02)
    raise AssertionError("the child never reached the checkpoint")


def assert_same_logs(run_dir: Path, reference: Path) -> None:
    rows, expected = progress_rows(run_dir), progress_rows(reference)
    assert [r["time/total_timesteps"] for r in rows] == [
        str(128 * i) for i in range(1, 9)]  # one row per rollout, none lost or repeated
    assert rows == expected
    assert (run_dir / "training_history.csv").read_text() == (
        reference / "training_history.csv").read_text()
    ours, theirs = scalars(run_dir), scalars(reference)
    assert ours.keys() == theirs.keys() and "rollout/ep_rew_mean" in ours
    for tag, events in theirs.items():
        assert ours[tag] == events, tag


def test_sigkill_mid_ppo_then_rerun_gives_the_uninterrupted_logs(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_child(out)
    try:
        killed_after = wait_for_checkpoint(proc, out, 512)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = progress_rows(out)
    assert 512 <= killed_after < 1024 and len(rows_at_kill) >= killed_after // 128
    summary = warmstart.main([*ARGS, "--output-dir", str(out)])  # the same command again
    assert summary["finished"]
    assert "[Resume] continuing from" in (out / "ppo_training.log").read_text()
    assert_same_logs(out, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_child(out)
    try:
        wait_for_checkpoint(proc, out, 256)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert lines[0] == (f"warmstart.py: interrupted at {latest['num_timesteps']:,} env steps; "
                        f"saved {out / 'checkpoints' / latest['checkpoint']}; run the same "
                        "command to continue")
    summary = warmstart.main([*ARGS, "--output-dir", str(out)])
    assert summary["finished"]
    assert_same_logs(out, uninterrupted)  # the Ctrl-C checkpoint resumes exactly
