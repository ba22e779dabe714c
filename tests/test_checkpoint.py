"""Checkpoints: exact restore, rotation, corruption, mismatch, and kill -9 during a write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.train

from sb3_warmstart.common.checkpoint import (  # noqa: E402
    CheckpointManager,
    CheckpointMismatch,
    CorruptCheckpoint,
)
from sb3_warmstart.pipeline.config import load_config  # noqa: E402
from sb3_warmstart.pipeline.ppo_stage import build_session  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "env_kwargs": {"episode_requests": 48},
    "warm_start": {"enabled": False},
    "ppo": {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 2,
            "lstm_hidden_size": 8, "net_arch": [8]},
    "stabilization": {"stabilization_steps": 64},
    "total_requests": 4096,
}


def make_session(tmp_path: Path, **ppo):
    """``(run, session)``: a cold-start session of the tiny config; ``run.monitor`` is its
    training monitor."""
    overrides = json.loads(json.dumps(OVERRIDES))
    overrides["ppo"].update(ppo)
    tmp_path.mkdir(parents=True, exist_ok=True)
    session = build_session(load_config(None, overrides=overrides), None)
    return SimpleNamespace(monitor=session.callbacks["monitor"]), session


def learn(run, session, steps):
    from stable_baselines3.common.callbacks import CallbackList

    callbacks = [session.callbacks[name] for name in ("stabilization", "temperature", "monitor")
                 if name in session.callbacks]
    session.model.learn(steps, callback=CallbackList(callbacks), reset_num_timesteps=False)


def params(session):
    return {k: v.clone() for k, v in session.model.policy.state_dict().items()}


@pytest.mark.slow
def test_restore_continues_exactly(tmp_path):
    pipeline, session = make_session(tmp_path / "a")
    manager = CheckpointManager(tmp_path / "a" / "checkpoints", max_checkpoints=3)
    learn(pipeline, session, 128)
    path = manager.save(session)
    learn(pipeline, session, 128)
    expected = params(session)
    expected_history = pipeline.monitor.history_rows()

    pipeline2, fresh = make_session(tmp_path / "b")
    manager.load(path, fresh)
    assert fresh.model.num_timesteps == 128
    learn(pipeline2, fresh, 128)
    got = params(fresh)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert pipeline2.monitor.history_rows() == expected_history


@pytest.mark.slow
def test_rotation_keeps_newest_and_latest_pointer(tmp_path):
    pipeline, session = make_session(tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=2)
    for _ in range(4):
        learn(pipeline, session, 64)
        manager.save(session)
    names = [p.name for p in manager.checkpoints()]
    assert names == ["step_000000000192", "step_000000000256"]
    assert manager.latest().name == "step_000000000256"
    manifest = manager.verify(manager.latest())
    assert manifest["num_timesteps"] == 256 and set(manifest["files"]) == {
        "model.zip", "state.pkl", "vecnormalize.json"}


@pytest.mark.slow
def test_corrupt_checkpoints_are_reported_never_loaded(tmp_path):
    pipeline, session = make_session(tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=3)
    learn(pipeline, session, 64)
    old = manager.save(session)
    learn(pipeline, session, 64)
    new = manager.save(session)
    model = new / "model.zip"
    model.write_bytes(model.read_bytes()[:-50])
    with pytest.raises(CorruptCheckpoint, match="model.zip does not match its checksum"):
        manager.verify(new)
    resumable, problems = manager.find_resumable()
    assert resumable == old and "model.zip" in problems[0]
    (old / "manifest.json").write_text("{not json")
    resumable, problems = manager.find_resumable()
    assert resumable is None and len(problems) == 2
    _, fresh = make_session(tmp_path / "fresh")
    before = params(fresh)
    with pytest.raises(CorruptCheckpoint):
        manager.load(new, fresh)
    assert all(torch.equal(before[k], v) for k, v in params(fresh).items())


def test_mismatched_checkpoint_lists_differences_and_changes_nothing(tmp_path):
    pipeline, session = make_session(tmp_path / "a")
    manager = CheckpointManager(tmp_path / "a" / "checkpoints", max_checkpoints=3)
    learn(pipeline, session, 64)
    path = manager.save(session)
    _, other = make_session(tmp_path / "b", lstm_hidden_size=4)
    before = params(other)
    with pytest.raises(CheckpointMismatch) as err:
        manager.load(path, other)
    assert "training.ppo.lstm_hidden_size: checkpoint 8, this run 4" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in params(other).items())


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_session, learn
    from sb3_warmstart.common import checkpoint as ck

    out, mode = Path(sys.argv[1]), sys.argv[2]
    pipeline, session = make_session(out)
    manager = ck.CheckpointManager(out / "checkpoints", max_checkpoints=3)
    learn(pipeline, session, 64)
    manager.save(session)
    learn(pipeline, session, 64)
    if mode == "state":  # killed half-way through writing state.pkl
        def slow(path, data):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            print("WRITING", flush=True)
            time.sleep(120)
        ck.atomic_write_bytes = slow
    else:  # killed after the new directory is in place, before latest.json moves
        real = ck.atomic_write_json
        def slow_json(path, data):
            if Path(path).name == "latest.json":
                print("WRITING", flush=True)
                time.sleep(120)
            return real(path, data)
        ck.atomic_write_json = slow_json
    manager.save(session)
""")


@pytest.mark.parametrize("mode", ["state", "pointer"])
@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_previous_valid(tmp_path, mode):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(tests=str(REPO_ROOT / "tests")), str(out),
         mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    folder = out / "checkpoints"
    leftovers = list(folder.glob(".tmp-*"))
    assert bool(leftovers) == (mode == "state")  # an interrupted write leaves only a temp dir
    manager = CheckpointManager(folder, max_checkpoints=3)  # cleans leftovers on start
    assert not list(folder.glob(".tmp-*"))
    assert manager.latest().name == "step_000000000064"
    resumable, problems = manager.find_resumable()
    assert resumable.name == "step_000000000064" and not problems
    _, fresh = make_session(tmp_path / "fresh")
    manager.load(resumable, fresh)
    assert fresh.model.num_timesteps == 64
    if mode == "pointer":  # the newer directory is complete too, just not yet "latest"
        manager.verify(folder / "step_000000000128")
