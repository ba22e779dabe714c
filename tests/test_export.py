"""Exporting a router: the ONNX runtime decides as the in-simulator policy on every request,
bad input (stats, sources, a missing extra) is refused in one line naming it, and the run's
models load with stock SB3 where only this project's base install, torch and SB3 are
importable."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import sysconfig
import textwrap
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.train
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch as th  # noqa: E402
from conftest import load_script  # noqa: E402
from stable_baselines3.common.running_mean_std import RunningMeanStd  # noqa: E402
from torch import nn  # noqa: E402

from llm_cluster_env.deploy.router_runtime import ExportedRouter, RouterInputError  # noqa: E402
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402
from sb3_warmstart.common.normalize import ObsNormalizer  # noqa: E402
from sb3_warmstart.export import (  # noqa: E402
    ExportError,
    export_policy,
    export_router,
    sample_observations,
)
from sb3_warmstart.policies.recurrent import TemperatureMlpPolicy  # noqa: E402
from sb3_warmstart.policies.replica_set import RecurrentReplicaSetPolicy, ReplicaSetPolicy  # noqa: E402
from sb3_warmstart.policies.router import PolicyRouter  # noqa: E402

export_cli = load_script("export")

CONV = {"scenario": "a100x4_conv_70"}


def conv(replicas: int, **extra) -> dict:
    """The conversation scenario on ``replicas`` A100s at ~70% load."""
    return {**CONV, "num_replicas": replicas, "workload": {"qps": 3.4 * replicas}, **extra}


def set_policy(cls, env_kwargs, seed=0):
    """A replica-set policy with its scaling fitted on ``lor`` observations and output layers
    re-drawn at unit gain (an untrained policy's scores are nearly equal by design)."""
    th.manual_seed(seed)
    obs, layout = sample_observations(env_kwargs, requests=300, seed=1)
    env = LLMClusterEnv(**env_kwargs)
    policy = cls(env.observation_space, env.action_space, lambda _: 3e-4,
                 replica_features=layout.replica_features,
                 tail_features=layout.names[layout.replica_block:], embed_dim=16, hidden_dim=32)
    policy.fit_feature_scaling(obs)
    nn.init.orthogonal_(policy.mlp_extractor.score[-1].weight, gain=1.0)
    return policy


def mlp_policy(env_kwargs, seed=0):
    """SB3's MLP policy (with the temperature switch) and observation statistics fitted on
    ``lor`` observations."""
    th.manual_seed(seed)
    obs, _ = sample_observations(env_kwargs, requests=300, seed=1)
    env = LLMClusterEnv(**env_kwargs)
    policy = TemperatureMlpPolicy(env.observation_space, env.action_space, lambda _: 3e-4,
                                  net_arch=[32, 32])
    nn.init.orthogonal_(policy.action_net.weight, gain=1.0)
    rms = RunningMeanStd(shape=obs.shape[1:])
    rms.update(obs.astype(np.float64))
    return policy, ObsNormalizer(rms)


#: Two replicas whose probabilities differ by less than this are a tie: torch and onnxruntime
#: round identical replicas' scores differently in the last bit, and each backend's argmax
#: then takes a different one of them.
TIE = 1e-6


def compare_decisions(policy_router, runtime, env_kwargs, seeds, requests=150,
                      as_dicts=False):
    """Route held-out episodes with ``policy_router`` and ask ``runtime`` at every request:
    ``(decisions, disagreements)``; a disagreement is ``(seed, decision, ours, theirs, gap)``
    with ``gap`` the difference of the two replicas' probabilities."""
    env = LLMClusterEnv(**dict(env_kwargs, episode_requests=requests))
    layout = env.layout
    tail = layout.names[layout.replica_block:layout.history_offset]
    total, disagreements = 0, []
    for seed in seeds:
        env.reset(seed=seed)
        policy_router.reset(env.num_replicas, np.random.default_rng(seed))
        runtime.reset()
        done = False
        while not done:
            view = env.view
            ours = policy_router.select(view)
            request = {name: float(view.obs[layout.replica_block + i])
                       for i, name in enumerate(tail)}
            if as_dicts:
                stats = [dict(zip(layout.replica_features, map(float, row)))
                         for row in view.replicas]
                decision = runtime.decide(stats, request)
            else:
                decision = runtime.decide(view.replicas, request,
                                          columns=layout.replica_features)
            total += 1
            if ours != decision.replica:
                p = decision.probabilities
                disagreements.append((seed, total, ours, decision.replica,
                                      float(abs(p[ours] - p[decision.replica]))))
            _, _, done, _, _ = env.step(ours)
    return total, disagreements


def assert_same_decisions(total, disagreements, expected_total):
    """Every decision agrees, except exact ties: replicas the policy scores equally (to float32
    rounding), such as identical idle replicas at the start of an episode."""
    assert total == expected_total
    assert [d for d in disagreements if d[4] > TIE] == []
    assert len(disagreements) <= 0.1 * total


@pytest.fixture(scope="module")
def set_export(tmp_path_factory):
    policy = set_policy(ReplicaSetPolicy, conv(4))
    out = tmp_path_factory.mktemp("export") / "set"
    result = export_policy(policy, None, conv(4), out, label="set", source="test",
                           sample_requests=48)
    return policy, out, result.schema


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [4, 9])
def test_exported_set_policy_decides_as_the_simulator_policy_on_every_request(set_export,
                                                                               replicas):
    policy, out, _ = set_export
    total, disagreements = compare_decisions(PolicyRouter(policy), ExportedRouter.load(out),
                                             conv(replicas), seeds=[501, 502])
    assert_same_decisions(total, disagreements, 300)


@pytest.mark.slow
def test_mapping_and_array_inputs_give_the_same_decisions(set_export):
    policy, out, _ = set_export
    total, disagreements = compare_decisions(PolicyRouter(policy), ExportedRouter.load(out),
                                             conv(3), seeds=[7], requests=60, as_dicts=True)
    assert_same_decisions(total, disagreements, 60)


@pytest.mark.slow
def test_exported_recurrent_set_policy_carries_its_lstm_state(tmp_path):
    policy = set_policy(RecurrentReplicaSetPolicy, conv(4), seed=1)
    out = tmp_path / "recurrent"
    schema = export_policy(policy, None, conv(4), out, label="rec", source="test",
                           sample_requests=32).schema
    assert schema["policy"]["recurrent"] and list(schema["inputs"]) == [
        "replicas", "request", "lstm_h", "lstm_c"]
    runtime = ExportedRouter.load(out)
    total, disagreements = compare_decisions(PolicyRouter(policy), runtime, conv(6),
                                             seeds=[601, 602])
    assert_same_decisions(total, disagreements, 300)
    # the state matters: the same stats after a different history give other probabilities
    columns = runtime.replica_features
    stats = np.random.default_rng(0).uniform(0.1, 3.0, (6, 11)).astype(np.float32)
    fractions = [i for i, f in enumerate(schema["replica_features"]) if f["unit"] == "fraction"]
    stats[:, fractions] /= 3.0  # kv_usage, dispatch_share: in [0, 1]
    request = {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 20.0}
    runtime.reset()
    first = runtime.decide(stats, request, columns=columns).probabilities
    second = runtime.decide(stats, request, columns=columns).probabilities
    runtime.reset()
    np.testing.assert_array_equal(runtime.decide(stats, request, columns=columns).probabilities,
                                  first)
    assert np.abs(first - second).max() > 1e-6


@pytest.mark.slow
def test_exported_mlp_policy_folds_vecnormalize_and_keeps_its_decision_history(tmp_path):
    env_kwargs = conv(4, observation={"history_window": 2})
    policy, normalizer = mlp_policy(env_kwargs)
    out = tmp_path / "mlp"
    schema = export_policy(policy, normalizer.obs_rms, env_kwargs, out, label="mlp",
                           source="test", sample_requests=48).schema
    assert schema["replica_count"] == {"mode": "fixed", "replicas": 4,
                                       "text": schema["replica_count"]["text"]}
    assert list(schema["inputs"]) == ["observation"]
    stats = json.loads((out / "sb3" / "vecnormalize.json").read_text())
    assert stats["norm_obs"] and stats["clip_obs"] == 10.0
    np.testing.assert_array_equal(stats["obs_rms"]["var"], normalizer.obs_rms.var)
    runtime = ExportedRouter.load(out)
    total, disagreements = compare_decisions(PolicyRouter(policy, normalizer.obs_rms), runtime,
                                             env_kwargs, seeds=[701, 702])
    assert_same_decisions(total, disagreements, 300)
    with pytest.raises(RouterInputError, match="5 given, this .flat. policy routes exactly 4"):
        runtime.route(np.ones((5, 11), np.float32), {"req/prompt_tokens_k": 1.0,
                                                      "global/arrival_rate": 1.0},
                      columns=runtime.replica_features)


def test_schema_names_units_sources_and_vllm_metrics(set_export):
    _, out, schema = set_export
    assert json.loads((out / "schema.json").read_text()) == schema
    features = {f["name"]: f for f in schema["replica_features"]}
    assert list(features) == ["queued", "running", "kv_usage", "prefill_tokens_k",
                              "decode_tokens_k", "dispatch_share", "speed_k", "kv_capacity_k",
                              "est_wait_s", "est_ttft_s", "est_delta_s"]
    assert features["queued"]["vllm_metric"] == "vllm:num_requests_waiting"
    assert features["running"]["vllm_metric"] == "vllm:num_requests_running"
    assert features["kv_usage"]["vllm_metric"] == "vllm:kv_cache_usage_perc"
    assert {features[f]["source"] for f in ("est_wait_s", "est_ttft_s", "est_delta_s")} == {
        "engine_model"}
    assert features["dispatch_share"]["source"] == "router"
    assert features["speed_k"]["source"] == "static_hardware"
    assert [f["unit"] for f in schema["request_features"]] == ["1k tokens", "requests/s"]
    assert schema["replica_count"]["mode"] == "dynamic"
    assert schema["inputs"]["replicas"]["shape"] == ["batch", "N", 11]
    assert schema["export_check"]["greedy_agreement"] == 1.0
    hardware = schema["reference_hardware"]
    assert [r for r in hardware if r["in_training_cluster"]] == [
        {"gpu": "a100", "model": "llama-2-7b", "tensor_parallel": 1, "in_training_cluster": True,
         "speed_k": pytest.approx(1.4307, abs=1e-3), "kv_capacity_k": pytest.approx(117.648),
         "prefill_tokens_per_s": pytest.approx(12730, rel=1e-3)}]
    assert {r["gpu"] for r in hardware} >= {"a100", "h100", "a40"}
    assert (out / "router_runtime.py").read_text().startswith('"""Route with an exported')


@pytest.mark.parametrize("mutate, message", [
    (lambda stats, req: stats[1].pop("est_wait_s"),
     r"replica 1: missing feature\(s\) \['est_wait_s'\]"),
    (lambda stats, req: stats[0].update(prefix_hit=0.5),
     r"replica 0: unknown feature\(s\) \['prefix_hit'\]: the stats have another schema"),
    (lambda stats, req: stats[2].update(speed_k=0.0), r"replica 2: speed_k=0.0: must be > 0"),
    (lambda stats, req: stats[3].update(kv_usage=float("nan")),
     r"replica 3: kv_usage=nan: must be finite and >= 0"),
    (lambda stats, req: stats[0].update(queued=-1), r"replica 0: queued=-1.0: must be finite"),
    (lambda stats, req: stats[0].update(running="many"),
     r"replica 0: feature 'running'='many': not a number"),
    (lambda stats, req: req.pop("global/arrival_rate"),
     r"request: missing feature\(s\) \['global/arrival_rate'\]"),
    (lambda stats, req: req.update({"req/output_tokens_k": 1.0}),
     r"request: unknown feature\(s\) \['req/output_tokens_k'\]"),
    (lambda stats, req: stats.clear(), "no replica to route to"),
])
def test_runtime_refuses_bad_stats_naming_replica_feature_and_value(set_export, mutate,
                                                                    message):
    _, out, schema = set_export
    runtime = ExportedRouter.load(out)
    names = [f["name"] for f in schema["replica_features"]]
    stats = [dict.fromkeys(names, 1.0) for _ in range(4)]
    request = {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0}
    assert 0 <= runtime.route(stats, request) < 4
    mutate(stats, request)
    with pytest.raises(RouterInputError, match=message):
        runtime.route(stats, request)


def test_runtime_takes_negative_engine_model_estimates_but_not_other_negatives(set_export):
    """The simulator's est_delta_s can be negative (its engine model compares decode
    intercepts); the policy reads it clamped at 0, so the runtime routes on it."""
    _, out, schema = set_export
    runtime = ExportedRouter.load(out)
    names = [f["name"] for f in schema["replica_features"]]
    stats = [dict.fromkeys(names, 1.0) for _ in range(4)]
    request = {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0}
    stats[1]["est_delta_s"] = -2.5
    clamped = [dict(s) for s in stats]
    clamped[1]["est_delta_s"] = 0.0
    np.testing.assert_array_equal(runtime.decide(stats, request).logits,
                                  runtime.decide(clamped, request).logits)
    stats[2]["est_wait_s"] = float("inf")
    with pytest.raises(RouterInputError, match=r"replica 2: est_wait_s=inf: must be finite$"):
        runtime.route(stats, request)
    stats[2]["est_wait_s"], stats[3]["decode_tokens_k"] = 1.0, -0.5
    with pytest.raises(RouterInputError, match="replica 3: decode_tokens_k=-0.5: must be "
                                               "finite and >= 0"):
        runtime.route(stats, request)


def test_runtime_refuses_an_array_of_another_replica_schema(set_export):
    _, out, _ = set_export
    runtime = ExportedRouter.load(out)
    request = {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0}
    columns = list(runtime.replica_features)
    stats = np.ones((4, len(columns)), np.float32)
    with pytest.raises(RouterInputError, match="needs columns="):
        runtime.route(stats, request)
    swapped = columns[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(RouterInputError, match="column 0 is 'running', the policy expects "
                                               "'queued'"):
        runtime.route(stats, request, columns=swapped)
    with pytest.raises(RouterInputError, match=r"missing \['est_delta_s'\], unknown "
                                               r"\['cache_usage'\]"):
        runtime.route(stats, request, columns=columns[:-1] + ["cache_usage"])
    with pytest.raises(RouterInputError, match=r"shape \(4, 10\), expected \(N, 11\)"):
        runtime.route(stats[:, :10], request, columns=columns)


def test_export_of_a_run_without_a_final_model_fails_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("LLMCluster-v0: {}\n")
    with pytest.raises(ExportError, match="no final_model.zip .the run has not finished"):
        export_router(run, tmp_path / "out")
    assert export_cli.main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert "no final_model.zip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_zip(tmp_path_factory) -> Path:
    """A tiny ``KLPPO`` replica-set model saved as SB3 saves it."""
    model_zip, _, _ = saved_model(tmp_path_factory.mktemp("model"), "replica_set", conv(4))
    return model_zip


def fake_run(folder: Path, model_zip: Path) -> Path:
    """A run folder as ``train/warmstart.py`` leaves it, as far as the export reads it:
    ``final_model.zip``, ``config.yaml`` (the resolved config keyed by env id) and
    ``final_vecnormalize.pkl`` (an object with ``obs_rms``)."""
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "final_model.zip").write_bytes(model_zip.read_bytes())
    config = {"LLMCluster-v0": {"default": {"ppo": {"algorithm": "ppo"}, "env_kwargs": conv(4)}}}
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (run / "final_vecnormalize.pkl").write_bytes(pickle.dumps(
        types.SimpleNamespace(obs_rms=None)))
    return run


def test_a_run_s_own_final_model_zip_exports_as_its_run_folder(tiny_model_zip, tmp_path,
                                                                capsys):
    run = fake_run(tmp_path, tiny_model_zip)
    out = tmp_path / "out"
    assert export_cli.main([str(run / "final_model.zip"), "--out", str(out),
                            "--sample-requests", "16"]) == 0
    assert "greedy agreement 100%" in capsys.readouterr().out
    schema = json.loads((out / "schema.json").read_text())
    assert schema["provenance"]["source"] == str(run.resolve())
    assert schema["provenance"]["label"] == "run"
    assert str(run / "final_model.zip") in (out / "sb3" / "README.md").read_text()


def _not_a_model(run: Path) -> tuple[Path, str]:
    path = run.parent / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    return path, (f"{path}: not a Stable-Baselines3 model zip (truncated, or another kind of "
                  "zip): no 'data' member among ['notes.txt']")


def _not_a_policy(run: Path) -> tuple[Path, str]:
    path = run.parent / "sb3_like.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", "{}")
    return path, (f"{path}: cannot load this policy zip (expected a policy zip of "
                  "train/pretrain.py, a run's final_model.zip or a checkpoint's model.zip)")


def _not_a_zip(run: Path) -> tuple[Path, str]:
    path = run.parent / "model.zip"
    path.write_text("hello")
    return path, f"{path}: not a readable zip archive (truncated or corrupt): BadZipFile"


def _truncated_model(run: Path) -> tuple[Path, str]:
    model = run / "final_model.zip"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return run, f"{model}: not a Stable-Baselines3 model zip (truncated"


def _truncated_model_given_as_zip(run: Path) -> tuple[Path, str]:
    path, message = _truncated_model(run)
    return path / "final_model.zip", message


def _corrupt_vecnormalize(run: Path) -> tuple[Path, str]:
    (run / "final_vecnormalize.pkl").write_bytes(b"\x80\x04garbage")
    return run, f"{run}: cannot load this run folder: UnpicklingError"


def _corrupt_checkpoint(run: Path) -> tuple[Path, str]:
    from sb3_warmstart.common.checkpoint import FORMAT_VERSION

    checkpoint = run / "checkpoints" / "step_64"
    checkpoint.mkdir()
    model = (run / "final_model.zip").read_bytes()
    (checkpoint / "model.zip").write_bytes(model[:-10])  # truncated after the manifest
    (checkpoint / "state.pkl").write_bytes(pickle.dumps({}))
    (checkpoint / "manifest.json").write_text(json.dumps({
        "format": FORMAT_VERSION,
        "files": {"model.zip": {"bytes": len(model), "sha256": "0" * 64},
                  "state.pkl": {"bytes": len(pickle.dumps({})), "sha256": "0" * 64}}}))
    return checkpoint / "model.zip", (f"{checkpoint}: cannot load this checkpoint: "
                                      "CorruptCheckpoint: ")


@pytest.mark.parametrize("make_bad", [_not_a_model, _not_a_policy, _not_a_zip,
                                      _truncated_model,
                                      _truncated_model_given_as_zip, _corrupt_vecnormalize,
                                      _corrupt_checkpoint])
def test_an_unreadable_source_ends_in_one_line_naming_the_file_and_status_2(
        make_bad, tiny_model_zip, tmp_path, capsys):
    source, message = make_bad(fake_run(tmp_path, tiny_model_zip))
    out = tmp_path / "out"
    assert export_cli.main([str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"train/export.py: error: {message}"), err[0]
    assert not out.exists()


@pytest.mark.slow
def test_export_without_the_deploy_extra_ends_in_one_line_naming_it(tiny_model_zip,
                                                                    tmp_path):
    """onnxscript missing (simulated in a fresh interpreter) is named with the install
    command before anything is loaded or written."""
    run = fake_run(tmp_path, tiny_model_zip)
    out = tmp_path / "out"
    script = tmp_path / "no_onnxscript.py"
    script.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.modules["onnxscript"] = None  # `import onnxscript` raises ModuleNotFoundError
        sys.argv = ["train/export.py", {str(run)!r}, "--out", {str(out)!r},
                    "--sample-requests", "8"]
        runpy.run_path({str(REPO_ROOT / "train" / "export.py")!r}, run_name="__main__")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert err == ["train/export.py: error: the ONNX export needs the deploy extra "
                   "(onnxscript not installed): pip install -e '.[deploy]'"]
    assert not out.exists()


def test_the_export_package_imports_nothing_from_the_simulator():
    """Architecture rule: sb3_warmstart reads the simulator only through the environment."""
    import ast

    imported = {}
    for path in sorted((REPO_ROOT / "sb3_warmstart" / "export").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update({a.name: path.name for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported[node.module] = path.name
    assert "llm_cluster_env.env.cluster_env" in imported  # the walk sees the lazy imports
    assert {m: f for m, f in imported.items() if m.startswith("llm_cluster_env.sim")} == {}


@pytest.mark.parametrize("scenario", ["a100x4_conv_70", "a100x4_vllm_v0", "heterogeneous"])
def test_reference_hardware_rows_of_the_training_cluster_equal_its_observed_features(scenario):
    from sb3_warmstart.export import reference_hardware

    env = LLMClusterEnv(scenario=scenario, episode_requests=4)
    obs, _ = env.reset(seed=0)
    layout = env.layout
    block = obs[: layout.replica_block].reshape(layout.num_slots, -1)[: env.num_replicas]
    rows = reference_hardware({"scenario": scenario})
    trained = {(r["gpu"], r["tensor_parallel"]): r for r in rows if r["in_training_cluster"]}
    configs = env.config.replica_configs
    assert set(trained) == {(c.gpu, c.tensor_parallel) for c in configs}
    for config, features in zip(configs, block):
        row = trained[(config.gpu, config.tensor_parallel)]
        assert row["speed_k"] == pytest.approx(features[layout.column["speed_k"]], rel=1e-6)
        assert row["kv_capacity_k"] == pytest.approx(features[layout.column["kv_capacity_k"]],
                                                     rel=1e-6)
    assert all(r["prefill_tokens_per_s"] > 1000 for r in rows)
    assert len({(r["gpu"], r["model"], r["tensor_parallel"]) for r in rows}) == len(rows)


def test_a_failed_export_leaves_the_earlier_one_untouched(set_export, tmp_path, monkeypatch):
    policy, out, _ = set_export
    earlier = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import sb3_warmstart.export.router_export as export

    monkeypatch.setattr(export, "write_onnx", lambda *a, **k: (_ for _ in ()).throw(
        ExportError("disk full")))
    with pytest.raises(ExportError, match="disk full"):
        export_policy(policy, None, conv(4), out, label="set", source="test",
                      sample_requests=8)
    now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert now == earlier
    assert sorted(p.name for p in out.parent.iterdir()) == ["set"]


# --------------------------------------------------------------------------- stock SB3 loading
#: Distributions the extras add beyond torch, SB3 and sb3-contrib (``train``: imitation,
#: PyYAML, TensorBoard, tqdm; ``deploy``: onnx, onnxscript, onnxruntime; ``ray``), as name
#: prefixes of their folders in site-packages. Loading a model must need none of them.
EXTRA_PREFIXES = ("imitation", "yaml", "_yaml", "pyyaml", "tensorboard", "tqdm", "onnx", "ray")
EXTRA_MODULES = ("imitation", "yaml", "tensorboard", "tqdm", "onnx", "onnxscript",
                 "onnxruntime", "ray")

_STOCK_LOAD = textwrap.dedent('''
    import importlib.util, json, sys
    import numpy as np

    EXTRAS = sys.argv[2].split(",")
    present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
    assert not present, f"extras importable: {present}"
    from stable_baselines3 import PPO
    from sb3_contrib import RecurrentPPO

    def actions_of(model_zip, algorithm, obs_file):
        cls = {"ppo": PPO, "recurrent_ppo": RecurrentPPO}[algorithm]
        model = cls.load(model_zip, device="cpu")  # stock SB3, no custom_objects
        obs = np.load(obs_file)
        if algorithm == "recurrent_ppo":
            actions, state = [], None
            for i, row in enumerate(obs):
                action, state = model.predict(row[None], state=state,
                                              episode_start=np.array([i == 0]),
                                              deterministic=True)
                actions.append(int(action[0]))
        else:
            actions = [int(a) for a in model.predict(obs, deterministic=True)[0]]
        return {"algorithm": type(model).__module__ + "." + type(model).__name__,
                "policy": type(model.policy).__module__ + "." + type(model.policy).__name__,
                "actions": actions}

    results = [actions_of(*job) for job in json.loads(sys.argv[1])]
    print(json.dumps({"results": results,
                      "export_loaded": [m for m in sys.modules
                                        if m.startswith("sb3_warmstart.export")]}))
''')


def site_packages_without_extras(folder: Path) -> Path:
    """``folder`` holding links to every entry of this interpreter's site-packages except the
    extras' (:data:`EXTRA_PREFIXES`): on ``sys.path`` of ``python -S`` it is an install of
    torch, SB3 and sb3-contrib (and their own dependencies) without them."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(EXTRA_PREFIXES) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def load_with_stock_sb3(tmp_path: Path, jobs: list[tuple[Path, str, np.ndarray]]
                        ) -> list[dict]:
    """Load each ``(model_zip, algorithm, obs)`` with stock ``PPO``/``RecurrentPPO`` in one
    subprocess that sees this project's sources and site-packages without the extras (none of
    :data:`EXTRA_MODULES` can be found there), and return each one's algorithm and policy
    class and greedy actions."""
    script = tmp_path / "load.py"
    script.write_text(_STOCK_LOAD)
    spec = []
    for k, (model_zip, algorithm, obs) in enumerate(jobs):
        np.save(tmp_path / f"obs{k}.npy", obs)
        spec.append([str(model_zip), algorithm, str(tmp_path / f"obs{k}.npy")])
    site = site_packages_without_extras(tmp_path / "site-packages")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(site)]),
           "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, "-S", str(script), json.dumps(spec),
                           ",".join(EXTRA_MODULES)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["export_loaded"] == []
    return out["results"]


def project_actions(model, obs: np.ndarray) -> list[int]:
    if hasattr(model.policy, "lstm_actor"):
        actions, state = [], None
        for i, row in enumerate(obs):
            action, state = model.predict(row[None], state=state,
                                          episode_start=np.array([i == 0]), deterministic=True)
            actions.append(int(action[0]))
        return actions
    return [int(a) for a in model.predict(obs, deterministic=True)[0]]


def saved_model(tmp_path: Path, kind: str, env_kwargs: dict) -> tuple[Path, str, np.ndarray]:
    """A tiny ``KLPPO``/``KLRecurrentPPO`` of ``kind`` saved to ``tmp_path``, and observations
    to compare actions on: ``(model_zip, algorithm, obs)``."""
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO
    from sb3_warmstart.pipeline.config import KLConfig

    obs, layout = sample_observations(env_kwargs, requests=40, seed=2)
    venv = make_vec_env(LLMClusterEnv, n_envs=1, env_kwargs=dict(env_kwargs,
                                                                 episode_requests=20))
    tail = list(layout.names[layout.replica_block:])
    common = dict(n_steps=16, batch_size=16, n_epochs=1, kl=KLConfig(), seed=0, device="cpu")
    recurrent = kind.startswith("recurrent")
    if kind == "mlp":  # acts on VecNormalize's output: standardise the sample the same way
        model = KLPPO(TemperatureMlpPolicy, venv, policy_kwargs={"net_arch": [16]}, **common)
        obs = ((obs - obs.mean(0)) / np.sqrt(obs.var(0) + 1e-8)).astype(np.float32)
    else:
        cls = RecurrentReplicaSetPolicy if recurrent else ReplicaSetPolicy
        algo = KLRecurrentPPO if recurrent else KLPPO
        model = algo(cls, venv, policy_kwargs=dict(replica_features=layout.replica_features,
                                                   tail_features=tail, embed_dim=8,
                                                   hidden_dim=16), **common)
        model.policy.fit_feature_scaling(obs)
    for module in (model.policy.action_net, getattr(model.policy.mlp_extractor, "score", None)):
        if isinstance(module, nn.Sequential):
            module = module[-1]
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, gain=1.0)
    model.save(tmp_path / f"{kind}.zip")
    return tmp_path / f"{kind}.zip", "recurrent_ppo" if recurrent else "ppo", obs


@pytest.mark.slow
def test_saved_models_load_with_stock_sb3_without_any_extra(tmp_path):
    from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO

    kinds = ["replica_set", "recurrent_replica_set", "mlp"]
    jobs = [saved_model(tmp_path, kind, conv(4)) for kind in kinds]
    theirs = load_with_stock_sb3(tmp_path, jobs)
    for kind, (model_zip, algorithm, obs), loaded in zip(kinds, jobs, theirs):
        algo = KLRecurrentPPO if algorithm == "recurrent_ppo" else KLPPO
        ours = project_actions(algo.load(model_zip, device="cpu"), obs)
        assert loaded["algorithm"] in ("stable_baselines3.ppo.ppo.PPO",
                                       "sb3_contrib.ppo_recurrent.ppo_recurrent.RecurrentPPO")
        assert loaded["policy"].startswith("sb3_warmstart.policies."), kind
        assert loaded["actions"] == ours, kind
        assert len(set(ours)) > 1, kind  # the comparison is not trivially constant


def test_the_graph_on_present_replicas_equals_the_policy_on_a_padded_observation():
    """The runtime passes one row per replica present; training pads to a fixed slot count.
    Both paths share the encoder and agree (the padded slots get probability 0)."""
    from sb3_warmstart.export import SetPolicyGraph

    env_kwargs = conv(6, observation={"replica_slots": 9})
    policy = set_policy(ReplicaSetPolicy, env_kwargs)
    obs, layout = sample_observations(env_kwargs, requests=80, seed=4)
    graph = SetPolicyGraph(policy)
    block = obs[:, : layout.replica_block].reshape(len(obs), 9, -1)
    assert not block[:, 6:].any() and (block[:, :6, layout.column["speed_k"]] > 0).all()
    tail = obs[:, layout.replica_block:layout.history_offset]
    with th.no_grad():
        padded = policy.get_distribution(th.as_tensor(obs)).distribution.probs.numpy()
        _, present = graph(th.as_tensor(block[:, :6].copy()), th.as_tensor(tail))
    np.testing.assert_allclose(present.numpy(), padded[:, :6], rtol=1e-5, atol=1e-7)
    assert (padded[:, 6:] == 0).all()
    assert (present.numpy().argmax(1) == padded.argmax(1)).mean() > 0.97


# --------------------------------------------------------------------------- end to end
warmstart = load_script("warmstart")

TINY_RUN = [
    "--ppo-requests", "512", "--demo-steps", "384", "--bc-epochs", "2", "--no-progress",
    "--set", "warm_start.demo_episode_requests=64",
    "--set", "family_overrides={replicas: [2, 5], replica_slots: 6, episode_requests: 64, "
             "capacity_requests: 200}",
    "--set", "evaluation.episodes=1", "--set", "evaluation.episode_requests=40",
    "--set", "evaluation.routers=[lor]",
    "--set", "stabilization.stabilization_steps=128", "--set", "ppo.n_steps=64",
    "--set", "ppo.batch_size=64", "--set", "ppo.n_envs=2", "--set", "ppo.set_embed_dim=16",
    "--set", "ppo.set_hidden_dim=16", "--set", "checkpointing.checkpoint_interval=256",
    "--set", "dagger.enabled=false",  # the DAgger stage: tests/test_pipeline_dagger.py
]


@pytest.mark.slow
def test_a_trained_run_exports_routes_as_in_the_simulator_and_loads_with_stock_sb3(
        tmp_path, capsys):
    from sb3_warmstart.algorithms.ppo import KLPPO
    from sb3_warmstart.policies.router import load_policy_router

    run = tmp_path / "run"
    assert warmstart.main([*TINY_RUN, "--output-dir", str(run)])["finished"]
    final_stats = json.loads((run / "final_vecnormalize.json").read_text())
    assert final_stats["norm_obs"] is False and final_stats["format"] == "vecnormalize/json"
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert "vecnormalize.json" in manifest["files"]

    out = tmp_path / "export"
    assert export_cli.main([str(run), "--out", str(out), "--sample-requests", "64"]) == 0
    printed = capsys.readouterr().out
    assert "replicas: any number" in printed and "greedy agreement 100%" in printed
    runtime = ExportedRouter.load(out)
    for replicas in (3, 7):
        total, disagreements = compare_decisions(load_policy_router(run), runtime,
                                                 conv(replicas), seeds=[901], requests=120)
        assert_same_decisions(total, disagreements, 120)

    obs, _ = sample_observations(conv(6, observation={"replica_slots": 6}), requests=40,
                                 seed=5)
    zips = (run / "final_model.zip", checkpoint / "model.zip")
    theirs = load_with_stock_sb3(tmp_path, [(z, "ppo", obs) for z in zips])
    for model_zip, loaded in zip(zips, theirs):
        assert loaded["actions"] == project_actions(KLPPO.load(model_zip, device="cpu"), obs)
    readme = (out / "sb3" / "README.md").read_text()
    assert str(run / "final_model.zip") in readme and 'PPO.load("final_model.zip"' in readme
    assert not (out / "sb3" / "router_policies").exists()

    # the run's own final_model.zip stands for the run folder
    again = tmp_path / "export-from-zip"
    assert export_cli.main([str(run / "final_model.zip"), "--out", str(again),
                            "--sample-requests", "16"]) == 0
    schema = json.loads((again / "schema.json").read_text())
    assert schema["provenance"]["source"] == str(run.resolve())
