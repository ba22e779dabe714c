"""train/warmstart.py end to end: smoke run, exact chunked resume, resume decisions, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.train

from conftest import load_script  # noqa: E402

warmstart = load_script("warmstart")
REPO_ROOT = Path(__file__).resolve().parents[1]

# One scenario, the LSTM policy over the flat observation (the generalist's family runs are
# in tests/test_generalist.py).
TINY = [
    "--family", "none", "--set", "ppo.algorithm=recurrent_ppo", "--set", "ppo.policy=mlp",
    "--ppo-requests", "512", "--demo-steps", "512", "--bc-epochs", "2", "--no-progress",
    "--set", "warm_start.demo_episode_requests=64", "--set", "env_kwargs.episode_requests=64",
    "--set", "evaluation.episodes=1", "--set", "evaluation.episode_requests=80",
    "--set", "evaluation.routers=[lor, round_robin]",
    "--set", "stabilization.stabilization_steps=128", "--set", "ppo.n_steps=64",
    "--set", "ppo.batch_size=64", "--set", "ppo.n_envs=2", "--set", "ppo.lstm_hidden_size=16",
    "--set", "ppo.net_arch=[16]", "--set", "checkpointing.checkpoint_interval=128",
    "--set", "checkpointing.max_checkpoints=2", "--set", "kl.kl_ref_decay_steps=10",
    "--set", "dagger.enabled=false",  # DAgger in the job: tests/test_pipeline_dagger.py
]


def run(out: Path, *extra: str, **hooks):
    return warmstart.main([*TINY, "--output-dir", str(out), *extra], **hooks)


def policy_params(run_dir: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(run_dir / "final_model.zip") as z:
        return torch.load(io.BytesIO(z.read("policy.pth")), weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    run(out)
    return out


@pytest.mark.slow
def test_smoke_run_writes_everything(finished_run):
    out = finished_run
    for name in ("config.yaml", "command.txt", "ppo_training.log", "progress.csv",
                 "training_history.csv", "training_progress.json", "final_model.zip",
                 "final_vecnormalize.pkl", "demos/stats.json", "pretrained/bc_policy.zip",
                 "checkpoints/latest.json", "report/report.md", "report/results.csv",
                 "report/learning_curve.png", "report/dispatch_distribution.png",
                 "report/latency_cdf.png"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["routers"]) == {"ppo", "bc_clone", "lor", "round_robin"}
    for metrics in summary["routers"].values():
        assert metrics["num_requests"] == 80 and 0 < metrics["e2e_mean"] < 100
    assert summary["comparison"]["best_heuristic"] in ("lor", "round_robin")
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["status"] == "finished" and progress["num_timesteps"] == 512
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["num_timesteps"] == 512
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # max_checkpoints
    log = (out / "ppo_training.log").read_text()
    assert "start: warmstart" in log and "BC (from scratch)" in log
    assert "| train/" in log and "kl_ref" in log
    # the resolved config reloads to the same config
    from sb3_warmstart.pipeline.config import load_config

    document = yaml.safe_load((out / "config.yaml").read_text())
    assert document["LLMCluster-v0"]["default"]["total_requests"] == 512
    assert load_config(out / "config.yaml").ppo.n_envs == 2


def outside_report(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file of a run folder outside ``report/`` (the
    lock files, which only the locking touches, left out)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.relative_to(run_dir).parts[0] != "report" and not p.name.startswith(".lock")}


@pytest.mark.slow
def test_rerun_of_finished_run_only_rewrites_the_report(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = outside_report(out)
    assert "final_model.zip" in before and "ppo_training.log" in before
    assert any(name.startswith("checkpoints/") for name in before)
    assert any(name.startswith("demos/") for name in before)
    report_before = (out / "report" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    summary = run(out)
    printed = capsys.readouterr().out
    assert summary["finished"] and set(summary["routers"]) == {"ppo", "bc_clone", "lor",
                                                               "round_robin"}
    assert "already finished; re-evaluating" in printed and "continuing from" not in printed
    assert outside_report(out) == before  # model, checkpoints, logs, demos: untouched
    assert (out / "report" / "results.json").stat().st_mtime_ns != report_before
    final = json.loads((finished_run / "report" / "results.json").read_text())
    assert summary["routers"]["ppo"] == final["routers"]["ppo"]  # the same policy, evaluated


@pytest.mark.slow
def test_chunked_run_with_resume_equals_uninterrupted_run(tmp_path):
    extra = ["--set", "advanced_optimization.learning_rate_schedule.type="
             "cosine_annealing_with_warmup",
             "--set", "advanced_optimization.learning_rate_schedule.warmup_steps=3",
             "--set", "advanced_optimization.learning_rate_schedule.restart_period=5",
             "--set", "checkpointing.checkpoint_interval=10000"]
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    run(whole, *extra)
    first = run(chunked, *extra, "--chunk-mode", "--chunk-size", "256", "--max-chunks", "1")
    assert first == {"finished": False, "num_timesteps": 256}
    progress = json.loads((chunked / "training_progress.json").read_text())
    assert [c["index"] for c in progress["chunks"]] == [0]
    run(chunked, *extra, "--chunk-mode", "--chunk-size", "256")  # same command again
    progress = json.loads((chunked / "training_progress.json").read_text())
    assert [c["index"] for c in progress["chunks"]] == [0, 1]
    a, b = policy_params(whole), policy_params(chunked)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    history_a = (whole / "training_history.csv").read_text()
    history_b = (chunked / "training_history.csv").read_text()
    assert history_a == history_b  # same episodes, same latencies, same dispatch shares
    ra = json.loads((whole / "report" / "results.json").read_text())["routers"]["ppo"]
    rb = json.loads((chunked / "report" / "results.json").read_text())["routers"]["ppo"]
    assert ra["e2e_mean"] == rb["e2e_mean"]


@pytest.mark.slow
def test_critic_warmup_across_a_chunk_boundary_equals_the_uninterrupted_run(tmp_path):
    # rollouts of 128 steps: stabilisation [0, 128), critic warm-up [128, 384): the chunk
    # boundary at 256 falls inside the warm-up
    extra = ["--set", "stabilization.critic_warmup_steps=256",
             "--set", "checkpointing.checkpoint_interval=10000"]
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    run(whole, *extra)
    run(chunked, *extra, "--chunk-mode", "--chunk-size", "256", "--max-chunks", "1")
    run(chunked, *extra, "--chunk-mode", "--chunk-size", "256")
    a, b = policy_params(whole), policy_params(chunked)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (whole / "training_history.csv").read_text() == \
        (chunked / "training_history.csv").read_text()
    for folder in (whole, chunked):
        rows = list(csv.DictReader(open(folder / "progress.csv")))
        flags = [(int(r["time/total_timesteps"]), r["train/critic_only"]) for r in rows
                 if r.get("train/critic_only")]
        # a row logs the update of the rollout before it
        assert flags == [(384, "1.0"), (512, "1.0")], flags


@pytest.fixture(scope="module")
def external_run(finished_run, tmp_path_factory) -> tuple[Path, str]:
    """A run started from the smoke run's clone as an external model (no demos, no BC)."""
    out = tmp_path_factory.mktemp("external") / "run"
    external = str(finished_run / "pretrained" / "bc_policy.zip")
    run(out, "--external-pretrain", external, "--skip-bc-training")
    return out, external


@pytest.mark.slow
def test_ask_refuses_without_terminal_and_prompts_with_one(external_run, tmp_path, capsys):
    source, external = external_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    with pytest.raises(SystemExit) as exit_info:
        run(out, "--external-pretrain", external, "--skip-bc-training",
            interactive=lambda: False)
    assert exit_info.value.code == 2
    questions = []

    def answer(text):
        questions.append(text)
        return "1"

    summary = run(out, "--external-pretrain", external, "--skip-bc-training",
                  interactive=lambda: True, prompt=answer)
    assert summary["finished"] and "[1] resume the checkpoint" in questions[0]
    assert "already finished; re-evaluating" in capsys.readouterr().out  # resumed: finished


@pytest.mark.slow
def test_resume_external_moves_the_earlier_outputs_aside(external_run, tmp_path):
    source, external = external_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    before = (out / "progress.csv").read_text()
    run(out, "--external-pretrain", external, "--skip-bc-training", "--resume", "external")
    assert (out / "pretrained" / "external.zip").is_file()
    previous = list(out.glob("previous-*"))
    assert len(previous) == 1  # the earlier run's outputs, kept whole
    assert list(previous[0].glob("checkpoints/step_*"))
    assert (previous[0] / "progress.csv").read_text() == before
    assert "external checkpoint" in (out / "ppo_training.log").read_text()


@pytest.mark.slow
def test_external_checkpoint_that_does_not_fit_is_refused(finished_run, tmp_path, capsys):
    external = str(finished_run / "pretrained" / "bc_policy.zip")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "run", "--replicas", "5", "--external-pretrain", external,
            "--skip-bc-training")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "num_replicas: checkpoint 4, env 5" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was created


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_reported_and_previous_used(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    state = out / "checkpoints" / latest / "state.pkl"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    run(out)
    log = (out / "ppo_training.log").read_text()
    assert "state.pkl does not match its checksum" in log
    assert "[Resume] continuing from" in log and "step_000000000384" in log


@pytest.mark.parametrize("change, difference", [
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--set", "ppo.learning_rate=0.001"], "ppo.learning_rate: 0.0003 -> 0.001"),
    (["--set", "ppo.lstm_hidden_size=8"], "ppo.lstm_hidden_size: 16 -> 8"),
])
@pytest.mark.slow
def test_rerun_with_other_settings_never_resumes_the_old_run(finished_run, tmp_path, capsys,
                                                              change, difference):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for strict in ([], ["--strict-resume"]):
        with pytest.raises(SystemExit) as exit_info:
            run(out, *change, *strict)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "holds a run with other settings" in err and difference in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # config.yaml, command.txt, logs: nothing rewritten


@pytest.mark.slow
def test_default_folder_with_another_run_sends_the_new_run_to_a_sibling(finished_run, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_run, tmp_path / "runs" / "default")
    args = [a for a in TINY] + ["--seed", "2"]
    summary = warmstart.main(args)
    assert summary["finished"]
    out = capsys.readouterr().out
    assert "runs/default holds a run with other settings (seed: 0 -> 2)" in out
    assert "runs/default-2" in out
    second = tmp_path / "runs" / "default-2"
    assert json.loads((second / "run.json").read_text())["training"]["seed"] == 2
    assert yaml.safe_load((tmp_path / "runs" / "default" / "config.yaml").read_text())[
        "LLMCluster-v0"]["default"]["seed"] == 0  # the first run's config is untouched
    again = warmstart.main(args)  # the same command again resumes the sibling (finished)
    assert again["finished"] and not (tmp_path / "runs" / "default-3").exists()
    assert f"already finished; re-evaluating: {Path('runs/default-2')}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_locked_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(SystemExit) as exit_info:
            run(out)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "is in use by another training run" in err and f"pid {holder.pid}" in err
        assert not (out / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait(timeout=30)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from sb3_warmstart.pipeline.run_folder import RunLock
lock = RunLock(Path(sys.argv[1]), "another training run")
lock.acquire()
print("LOCKED", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("argv, message", [
    (["--ppo-requests", "0"], "total_requests=0: must be >= 1"),
    (["--qps", "-3"], "env_kwargs.workload.qps=-3.0"),
    (["--seed", "-1"], "LLMCluster-v0.default.seed=-1: must be in [0, 4294967295]"),
    (["--replicas", "0"], "env_kwargs.num_replicas=0"),
    (["--bc-epochs", "0"], "bc.epochs=0: must be >= 1"),
    (["--profile", "nope"], "--profile='nope': not in"),
    (["--chunk-size", "100"], "--chunk-size=100: needs --chunk-mode"),
    (["--skip-bc-training"], "--skip-bc-training: needs --external-pretrain"),
    (["--external-pretrain", "/nonexistent.zip"], "no such file"),
    (["--set", "ppo.n_stepz=5"], "LLMCluster-v0.default.ppo.n_stepz: unknown key"),
    (["--set", "ppo.n_steps=many"], "ppo.n_steps='many': expected an integer"),
    (["--set", "warm_start.demo_policies={fastest: 1}"], "demo_policies='fastest'"),
    (["--set", "env_kwargs.workload.arrival=weibull"], "env_kwargs.workload.arrival='weibull'"),
    (["--set", "noequals"], "expected KEY=VALUE"),
    (["--ppo-requests", "10", "--total-requests", "20"], "disagree"),
])
def test_bad_cli_values_fail_before_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        warmstart.main([*argv, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("text, message", [
    ("LLMCluster-v0:\n  default:\n    ppo: {n_envs: two}\n",
     "LLMCluster-v0.default.ppo.n_envs='two': expected an integer"),
    ("LLMCluster-v0:\n  default:\n    kl: {kl_ref_coeff: 1}\n", "kl.kl_ref_coeff: unknown key"),
    ("CartPole-v1:\n  default: {}\n", "expected a top-level 'LLMCluster-v0:' key"),
    ("LLMCluster-v0: [1, 2\n", "not valid YAML"),
    ("LLMCluster-v0:\n  default: {}\n  other:\n    total_requests: -5\n",
     "LLMCluster-v0.other"),
])
def test_bad_yaml_fails_naming_the_key(text, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    profile = "other" if "other" in text else "default"
    with pytest.raises(SystemExit):
        warmstart.main(["--config", str(config), "--profile", profile,
                        "--output-dir", str(tmp_path / "run")])
    assert message in capsys.readouterr().err


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


def test_help_shows_the_defaults_of_the_config_it_would_run(capsys):
    from sb3_warmstart.pipeline.config import PPOConfig, TrainingConfig

    config = TrainingConfig()
    text = _help(warmstart.build_parser(config))
    assert f"(default: {config.ppo.algorithm})" in text and "LSTM RecurrentPPO (default)" not in text
    for value in (config.total_requests, config.warm_start.demo_steps, config.bc.epochs,
                  config.seed, config.family, config.env.num_replicas):
        assert f"(default: {value})" in text
    assert "{recurrent_ppo,ppo}" in text  # the choices are the config's Literal
    other = TrainingConfig(family=None, ppo=PPOConfig(algorithm="recurrent_ppo", policy="mlp"),
                           total_requests=1234)
    text = _help(warmstart.build_parser(other))
    assert "(default: recurrent_ppo)" in text and "(default: 1234)" in text
    with pytest.raises(SystemExit) as exit_info:  # --help of a profile shows that profile's
        warmstart.main(["--profile", "single_scenario", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "(default: recurrent_ppo)" in printed and "profile 'single_scenario'" in printed


def test_yaml_default_profile_equals_embedded_defaults():
    from sb3_warmstart.pipeline.config import TrainingConfig, load_config

    repo = Path(__file__).resolve().parents[1]
    assert load_config(repo / "configs" / "warmstart.yaml") == TrainingConfig()
    document = yaml.safe_load((repo / "configs" / "warmstart.yaml").read_text())
    for profile in document["LLMCluster-v0"]:
        load_config(repo / "configs" / "warmstart.yaml", profile)  # every profile is valid


evaluate = load_script("evaluate")


@pytest.mark.slow
def test_evaluate_run_folder_checkpoint_and_pretrained(finished_run, tmp_path):
    summary = evaluate.main(["--model", str(finished_run), "--episodes", "1",
                             "--episode-requests", "60", "--routers", "lor",
                             "--output-dir", str(tmp_path / "a")])
    assert set(summary["routers"]) == {"ppo", "lor"}
    assert (tmp_path / "a" / "learning_curve.png").is_file()  # the run's history came along
    final = json.loads((finished_run / "report" / "results.json").read_text())
    assert summary["routers"]["ppo"]["num_requests"] == 60 != final["routers"]["ppo"][
        "num_requests"]
    checkpoint = sorted((finished_run / "checkpoints").glob("step_*"))[-1]
    summary = evaluate.main(["--model", str(checkpoint), "--scenario", "a100x4_conv_90",
                             "--episodes", "1", "--episode-requests", "60", "--routers", "lor",
                             "--output-dir", str(tmp_path / "b")])
    assert summary["routers"]["ppo"]["e2e_mean"] > 0
    summary = evaluate.main(["--model", str(finished_run / "pretrained" / "bc_policy.zip"),
                             "--episodes", "1", "--episode-requests", "60", "--routers",
                             "round_robin", "--output-dir", str(tmp_path / "c")])
    assert set(summary["routers"]) == {"ppo", "round_robin"}


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "a100x16"], "expects observations (46,) and 4 actions"),
    (["--routers", "lor,fastest"], "evaluation.routers='fastest': unknown router"),
    (["--episodes", "0"], "evaluation.episodes=0: must be >= 1"),
])
@pytest.mark.slow
def test_evaluate_rejects_bad_input(finished_run, argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(finished_run), *argv])
    assert message in capsys.readouterr().err


def test_evaluate_rejects_missing_and_corrupt_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path / "none.zip")])
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(bad)])
    assert "cannot load a policy" in capsys.readouterr().err


@pytest.mark.slow
def test_external_checkpoint_is_fine_tuned_on_fresh_demos(finished_run, tmp_path):
    from sb3_warmstart.policies.policy_file import read_metadata

    external = finished_run / "pretrained" / "bc_policy.zip"
    out = tmp_path / "run"
    run(out, "--external-pretrain", str(external), "--seed", "3")
    log = (out / "ppo_training.log").read_text()
    assert "start: external" in log and "BC (fine-tuned external)" in log
    assert (out / "pretrained" / "external.zip").read_bytes() == external.read_bytes()
    meta = read_metadata(out / "pretrained" / "bc_policy.zip")
    assert meta["bc_metrics"]["final"]["fine_tuned"] is True
    # the external model's normalisation is kept, so its inputs keep their meaning
    assert meta["obs_normalization"]["mean"] == read_metadata(external)["obs_normalization"]["mean"]
