"""``examples/rllib_ppo.py``: RLlib PPO trains ``LLMCluster-v0`` on 2 remote env runners that
find the env either way the example registers it (``make test-ray``; skipped without ray)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="ray is not installed (make test-ray)")]

REPO_ROOT = Path(__file__).resolve().parents[1]

@pytest.mark.parametrize("registration", ["register_env", "module_id"])
def test_rllib_ppo_trains_on_two_remote_env_runners(registration, tmp_path):
    # the script imports llm_cluster_env only inside the env creator (register_env) or not at
    # all (module_id): the workers must find the env through the registration alone
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "rllib_ppo.py"), "--summary-json", str(out),
         "--iterations", "2", "--env-runners", "2", "--registration", registration,
         "--train-batch-size", "256", "--epochs", "1", "--episode-requests", "64",
         "--eval-episodes", "1", "--eval-episode-requests", "100", "--num-cpus", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(out.read_text())
    history = summary["history"]
    assert len(history) == 2
    assert all(row["remote_env_runners"] == 2 for row in history)
    assert history[-1]["env_steps"] >= 512
    # episode metrics reached the driver from the remote runners' envs
    assert history[-1]["e2e_mean"] > 0 and 0 <= history[-1]["balance"] <= 1
    assert summary["eval_e2e_mean"] > 0 and summary["lor_e2e_mean"] > 0
    # evaluated by the evaluation runner: the evaluation episodes' length, not the training one
    assert summary["eval_episode_len_mean"] == 100
