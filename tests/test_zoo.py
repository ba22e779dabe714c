"""RL Zoo: the hyperparameter files of ``configs/zoo/`` are zoo format and build valid
environments (anywhere), and ``rl_zoo3.train`` / ``rl_zoo3.enjoy`` run with them on a tiny
budget, the KL algorithms through ``sb3_warmstart.algorithms.zoo`` (in ``.venv-zoo``: ``make
test-zoo``; skipped where rl_zoo3 is not installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_cluster_env.config import EnvConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO_ROOT / "configs" / "zoo"
ZOO_FILES = {"ppo": "ppo.yml", "ppo_lstm": "ppo_lstm.yml", "klppo": "klppo.yml",
             "klppo_lstm": "klppo_lstm.yml"}
#: Algorithms rl_zoo3 does not know: run through our launcher, which registers them.
KL_ALGOS = {"klppo", "klppo_lstm"}
POLICIES = {"ppo": "MlpPolicy", "ppo_lstm": "MlpLstmPolicy", "klppo": "TemperatureMlpPolicy",
            "klppo_lstm": "TemperatureMlpLstmPolicy"}
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
    allowed = ZOO_KEYS | PPO_KWARGS
    if algo in KL_ALGOS:
        from sb3_warmstart.pipeline.config import KLConfig

        kl_fields = set(KLConfig.__dataclass_fields__)
        allowed = allowed | kl_fields | {"init_policy"}
        assert kl_fields - {"entropy_min", "entropy_floor_coef"} <= set(params)
        KLConfig(**{k: v for k, v in params.items() if k in kl_fields})  # valid settings
    assert set(params) <= allowed, set(params) - allowed
    assert params["policy"] == POLICIES[algo]
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


def _zoo(algo: str, script: str) -> list[str]:
    """The command that runs rl_zoo3's ``script`` with ``algo`` (ours through the launcher)."""
    if algo in KL_ALGOS:
        return ["-m", "sb3_warmstart.algorithms.zoo", script]
    return ["-m", f"rl_zoo3.{script}"]


TINY = ["-n", "256", "--eval-freq", "-1", "--seed", "0", "--env-kwargs", "episode_requests:40",
        "-params", "n_envs:2", "n_steps:64", "batch_size:64"]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ZOO, reason="rl_zoo3 is not installed (make test-zoo)")
@pytest.mark.parametrize("algo", sorted(ZOO_FILES))
def test_rl_zoo_train_and_enjoy_on_a_tiny_budget(algo, tmp_path):
    common = ["--algo", algo, "--env", "LLMCluster-v0", "--gym-packages", "llm_cluster_env",
              "-f", str(tmp_path / "logs"), "--num-threads", "1"]
    out = _run([*_zoo(algo, "train"), *common, "--conf-file", str(ZOO_DIR / ZOO_FILES[algo]),
                *TINY], tmp_path)
    run = tmp_path / "logs" / algo / "LLMCluster-v0_1"
    assert (run / "LLMCluster-v0.zip").is_file(), out[-2000:]
    assert (run / "LLMCluster-v0" / "vecnormalize.pkl").is_file()
    if algo in KL_ALGOS:  # the YAML's flat KL keywords reached the algorithm
        assert "kl_ref_coef_initial" in (run / "LLMCluster-v0" / "config.yml").read_text()
    # enjoy renders by default (render_mode="human": the env prints its text summary)
    out = _run([*_zoo(algo, "enjoy"), *common, "--exp-id", "1", "-n", "100",
                "--deterministic"], tmp_path)
    assert "Episode Reward" in out or "episode_reward" in out.lower(), out[-2000:]
    assert "pending request" in out and "kv_usage" in out, out[-2000:]
    # the benchmark loads the same folder and routes held-out episodes with the policy
    _run([str(REPO_ROOT / "benchmarks" / "zoo_router.py"), str(run), "--episodes", "1",
          "--episode-requests", "60"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == algo and summary["num_timesteps"] >= 256
    assert 0.0 <= summary["policy_balance"] <= 1.0
    assert summary["policy_e2e_mean"] > 0 and summary["lor_e2e_mean"] > 0


_CLONE = textwrap.dedent("""
    import ast, sys, gymnasium as gym, torch as th, llm_cluster_env
    from stable_baselines3.common.running_mean_std import RunningMeanStd
    from stable_baselines3.common.vec_env import DummyVecEnv
    from sb3_warmstart.algorithms.ppo import KLPPO
    from sb3_warmstart.policies.policy_file import save_pretrained
    env_kwargs = {**ast.literal_eval(sys.argv[2]), "episode_requests": 40}
    venv = DummyVecEnv([lambda: gym.make("LLMCluster-v0", **env_kwargs)])
    model = KLPPO("TemperatureMlpPolicy", venv, seed=1, policy_kwargs=eval(sys.argv[3]))  # the zoo's "dict(...)" string
    with th.no_grad():
        for p in model.policy.parameters():
            p.add_(0.25)
    obs_rms = RunningMeanStd(shape=venv.observation_space.shape)
    save_pretrained(sys.argv[1], model.policy, {}, obs_rms,
                    observation_schema=venv.envs[0].unwrapped.layout.schema())
""")

_CHECK = textwrap.dedent("""
    import sys, torch as th
    from sb3_warmstart.algorithms.ppo import KLPPO
    from sb3_warmstart.policies.policy_file import load_pretrained
    trained = KLPPO.load(sys.argv[1], device="cpu")
    cloned, _, _ = load_pretrained(sys.argv[2])
    reference = trained.reference_policy.state_dict()
    same = all(th.equal(reference[k], v) for k, v in cloned.policy.state_dict().items())
    moved = not th.equal(trained.policy.action_net.weight, cloned.policy.action_net.weight)
    print("reference is the cloned policy:", same, "learner moved:", moved)
""")


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ZOO, reason="rl_zoo3 is not installed (make test-zoo)")
def test_rl_zoo_klppo_starts_from_a_cloned_policy_file(tmp_path):
    """``init_policy`` from the zoo's command line: the run's KL reference is the cloned policy
    (kept frozen), and training moved the learner away from it."""
    params = _hyperparams("klppo")
    policy_file = tmp_path / "bc.zip"
    _run(["-c", _CLONE, str(policy_file), repr(params["env_kwargs"]), params["policy_kwargs"]],
         tmp_path)
    out = _run([*_zoo("klppo", "train"), "--algo", "klppo", "--env", "LLMCluster-v0",
                "--gym-packages", "llm_cluster_env", "-f", str(tmp_path / "logs"),
                "--num-threads", "1", "--conf-file", str(ZOO_DIR / "klppo.yml"), *TINY,
                f"init_policy:{str(policy_file)!r}"], tmp_path)
    run = tmp_path / "logs" / "klppo" / "LLMCluster-v0_1"
    assert (run / "LLMCluster-v0.zip").is_file(), out[-2000:]
    check = _run(["-c", _CHECK, str(run / "LLMCluster-v0.zip"), str(policy_file)], tmp_path)
    assert "reference is the cloned policy: True learner moved: True" in check, check[-2000:]

