"""RL Zoo: the hyperparameter files of ``configs/zoo/`` are zoo format and build valid
environments (anywhere), and ``rl_zoo3.train`` / ``rl_zoo3.enjoy`` run with them on a tiny
budget (in ``.venv-zoo``: ``make test-zoo``; skipped where rl_zoo3 is not installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_cluster_env.config import EnvConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO_ROOT / "configs" / "zoo"
ZOO_FILES = {"ppo": "ppo.yml", "ppo_lstm": "ppo_lstm.yml"}
#: The keys rl_zoo3 2.9's ExperimentManager reads itself; every other key must be a keyword
#: argument of the algorithm.
ZOO_KEYS = {"n_envs", "n_timesteps", "policy", "normalize", "policy_kwargs", "env_kwargs",
            "env_wrapper", "frame_stack", "callback", "vec_env_wrapper", "monitor_kwargs"}
PPO_KWARGS = {"learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda",
              "clip_range", "clip_range_vf", "normalize_advantage", "ent_coef", "vf_coef",
              "max_grad_norm", "use_sde", "sde_sample_freq", "target_kl"}
HAVE_ZOO = importlib.util.find_spec("rl_zoo3") is not None


def _hyperparams(algo: str) -> dict:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load((ZOO_DIR / ZOO_FILES[algo]).read_text())
    assert list(document) == ["LLMCluster-v0"]
    return document["LLMCluster-v0"]


@pytest.mark.parametrize("algo", sorted(ZOO_FILES))
def test_zoo_files_are_zoo_format_and_build_the_env(algo):
    params = _hyperparams(algo)
    assert {"n_envs", "n_timesteps", "policy", "normalize", "policy_kwargs",
            "env_kwargs"} <= set(params)
    assert set(params) <= ZOO_KEYS | PPO_KWARGS, set(params) - ZOO_KEYS - PPO_KWARGS
    assert params["policy"] == {"ppo": "MlpPolicy", "ppo_lstm": "MlpLstmPolicy"}[algo]
    assert params["n_steps"] * params["n_envs"] % params["batch_size"] == 0
    config = EnvConfig.from_kwargs(**params["env_kwargs"])  # validated like gym.make's kwargs
    assert config.reward.imbalance_penalty > 0


def test_project_profiles_file_is_not_a_zoo_file():
    """``configs/warmstart.yaml`` is this project's profiles file (env id -> profiles), and
    says so; the zoo's files live in configs/zoo/."""
    text = (REPO_ROOT / "configs" / "warmstart.yaml").read_text()
    assert "not an RL Zoo" in text and "configs/zoo/" in text


def _run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ZOO, reason="rl_zoo3 is not installed (make test-zoo)")
@pytest.mark.parametrize("algo", sorted(ZOO_FILES))
def test_rl_zoo_train_and_enjoy_on_a_tiny_budget(algo, tmp_path):
    common = ["--algo", algo, "--env", "LLMCluster-v0", "--gym-packages", "llm_cluster_env",
              "-f", str(tmp_path / "logs"), "--num-threads", "1"]
    out = _run(["-m", "rl_zoo3.train", *common, "--conf-file", str(ZOO_DIR / ZOO_FILES[algo]),
                "-n", "256", "--eval-freq", "-1", "--seed", "0",
                "--env-kwargs", "episode_requests:40",
                "-params", "n_envs:2", "n_steps:64", "batch_size:64"], tmp_path)
    run = tmp_path / "logs" / algo / "LLMCluster-v0_1"
    assert (run / "LLMCluster-v0.zip").is_file(), out[-2000:]
    assert (run / "LLMCluster-v0" / "vecnormalize.pkl").is_file()
    out = _run(["-m", "rl_zoo3.enjoy", *common, "--exp-id", "1", "-n", "100", "--no-render",
                "--deterministic"], tmp_path)
    assert "Episode Reward" in out or "episode_reward" in out.lower(), out[-2000:]
    # the benchmark loads the same folder and routes held-out episodes with the policy
    _run([str(REPO_ROOT / "benchmarks" / "zoo_router.py"), str(run), "--episodes", "1",
          "--episode-requests", "60"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == algo and summary["num_timesteps"] >= 256
    assert 0.0 <= summary["policy_balance"] <= 1.0
    assert summary["policy_e2e_mean"] > 0 and summary["lor_e2e_mean"] > 0
