"""DAgger across a scenario family and inside the main job (the ``dagger`` section):
bad settings fail before any work naming key and value; the learner's visited states carry the
teacher's labels; an interrupted run resumes without relabelling to the same policy; the job
writes ``pretrained/distilled_policy.zip`` and PPO starts from it and is regularised toward it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytestmark = pytest.mark.train

import torch as th  # noqa: E402
from conftest import load_script  # noqa: E402

from llm_cluster_env.env.family import ScenarioFamilyEnv, load_family  # noqa: E402
from llm_cluster_env.routing.heuristics import LeastAddedTimeRouter  # noqa: E402
from llm_cluster_env.validation import ConfigError  # noqa: E402
from sb3_warmstart.pipeline.config import BCConfig, PPOConfig, load_config  # noqa: E402
from sb3_warmstart.warmstart.dagger import (  # noqa: E402
    DAggerConfig,
    load_round_policy,
    make_teacher,
    run_dagger,
)

warmstart = load_script("warmstart")

FAMILY = load_family("generalist", {"replicas": [2, 4], "replica_slots": 4,
                                    "gpus": {"a100": 1.0, "h100": 1.0}, "mixed_gpus": 0.0,
                                    "episode_requests": 30, "capacity_requests": 50})
TINY_BC = BCConfig(epochs=2, batch_size=4, sequence_length=8)
PPO = PPOConfig(set_embed_dim=16, set_hidden_dim=16)
LOOP = DAggerConfig(teacher="least_added_time", rounds=2, episodes_per_round=2,
                    episode_seed_base=500)


@pytest.fixture(autouse=True)
def one_thread():
    th.set_num_threads(1)


class Interrupt(RuntimeError):
    pass


def stop_at(round_index: int, stage: str):
    def callback(event):
        if event.round_index == round_index and event.stage == stage:
            raise Interrupt(f"stopped after round {round_index} {stage}")
    return callback


@pytest.fixture(scope="module")
def clone_file(tmp_path_factory):
    """A clone of least_added_time across the family (DAgger's round 0 of a teacher-routed
    episode): the initial policy of the family runs below."""
    th.set_num_threads(1)
    out = tmp_path_factory.mktemp("clone")
    with pytest.raises(Interrupt):  # stopped once policy_round_0.zip is written
        run_dagger(DAggerConfig(teacher="least_added_time", rounds=1, episodes_per_round=2,
                                episode_seed_base=100),
                   spec=FAMILY, bc=TINY_BC, ppo=PPO, out=out, callback=stop_at(0, "trained"))
    return out / "policy_round_0.zip"


def family_run(out, clone, **kwargs):
    return run_dagger(LOOP, spec=FAMILY, bc=TINY_BC, ppo=PPO, out=out, initial_policy=clone,
                      **kwargs)


# ------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("key, value, message", [
    ("rounds", 0, "dagger.rounds=0: must be >= 1"),
    ("teacher", "lookahed", "dagger.teacher='lookahed': unknown router"),
    ("episodes_per_round", 0, "dagger.episodes_per_round=0: must be >= 1"),
    ("beta", 1.5, "dagger.beta=1.5: must be in [0, 1]"),
    ("alternative_teachers", ["no_such"], "dagger.alternative_teachers='no_such': unknown router"),
    ("alternative_teachers", ["lookahead"],
     "dagger.alternative_teachers=['lookahead']: must not repeat a router or the teacher"),
    ("teacher_margin", 1.0, "dagger.teacher_margin=1.0: must be in [0, 1"),
    ("cost_temperature", -0.5, "dagger.cost_temperature=-0.5: must be a finite number >= 0"),
])
def test_bad_dagger_settings_fail_before_any_work_naming_key_and_value(key, value, message,
                                                                       tmp_path, capsys):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides={"dagger": {key: value}})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        warmstart.main(["--set", f"dagger.{key}={value}", "--output-dir", str(out)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_teacher_that_cannot_serve_the_family_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        warmstart.main(["--set", "dagger.teacher=rollout_planner", "--output-dir", str(out)])
    assert stop.value.code == 2
    assert ("dagger.teacher='rollout_planner': it samples futures of poisson and gamma "
            "arrivals only") in capsys.readouterr().err
    assert not out.exists()


def test_an_alternative_teacher_that_cannot_serve_the_family_is_refused_naming_it(tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        warmstart.main(["--set", "dagger.alternative_teachers=[least_added_time,rollout_planner]",
                        "--output-dir", str(out)])
    assert stop.value.code == 2
    assert ("dagger.alternative_teachers='rollout_planner': it samples futures of poisson and "
            "gamma arrivals only") in capsys.readouterr().err
    assert not out.exists()


def test_dagger_is_part_of_the_training_identity():
    base = load_config(None)
    other = base.with_overrides({"dagger": {"rounds": base.dagger.rounds + 1}})
    assert base.training_identity()["dagger"] != other.training_identity()["dagger"]
    # alternatives added later: absent from the identity of runs without them, present with
    assert "alternative_teachers" not in base.training_identity()["dagger"]
    assert "teacher_margin" not in base.training_identity()["dagger"]
    alt = base.with_overrides({"dagger": {"alternative_teachers": ["least_added_time"]}})
    assert alt.training_identity()["dagger"]["alternative_teachers"] == ["least_added_time"]
    assert alt.dagger.alternative_teachers == ("least_added_time",)
    # soft labels, added later too: in the identity only when used
    assert "cost_temperature" not in base.training_identity()["dagger"]
    soft = base.with_overrides({"dagger": {"cost_temperature": 0.02}})
    assert soft.training_identity()["dagger"]["cost_temperature"] == 0.02


# -------------------------------------------------------------------------------- family
def test_family_dagger_labels_the_states_the_learner_visited(tmp_path, clone_file):
    result = family_run(tmp_path, clone_file)
    assert result.first_round == 1 and [p.name for p in result.policy_paths] == [
        "policy_round_0.zip", "policy_round_1.zip", "policy_round_2.zip"]
    assert (tmp_path / "policy_round_0.zip").read_bytes() == clone_file.read_bytes()
    layout = ScenarioFamilyEnv(FAMILY).layout
    teacher = make_teacher("least_added_time")
    teacher.reset(layout.num_slots)
    total = 0
    for k, data in enumerate(result.rounds, start=1):
        assert data.seeds.tolist() == LOOP.episode_seeds(k)
        assert data.lengths.tolist() == [30, 30] and not data.teacher_acted.any()
        views = [layout.view(row) for row in data.obs]
        # the label is the teacher's choice on the state ...
        np.testing.assert_array_equal([teacher.select(v) for v in views], data.labels)
        # ... that the previous round's policy reached and acted on
        learner = load_round_policy(tmp_path, k - 1)
        learner.reset(layout.num_slots)
        np.testing.assert_array_equal([learner.select(v) for v in views], data.actions)
        total += data.num_states
        assert result.bc_summaries[k]["steps"] == total
    sizes = set()
    for seed in LOOP.episode_seeds(1) + LOOP.episode_seeds(2):  # the episodes' scenarios vary
        env = ScenarioFamilyEnv(FAMILY)
        env.reset(seed=seed)
        sizes.add((env.num_replicas, env.scenario["load"]))
    assert len(sizes) > 1


def test_family_dagger_resumes_without_relabelling_to_the_same_policy(tmp_path, clone_file,
                                                                      monkeypatch):
    calls = [0]
    select = LeastAddedTimeRouter.select

    def counting(router, view):
        calls[0] += 1
        return select(router, view)

    monkeypatch.setattr(LeastAddedTimeRouter, "select", counting)
    whole = family_run(tmp_path / "whole", clone_file)
    assert calls[0] == 2 * 60  # rounds 1 and 2: one label per visited state
    calls[0] = 0
    with pytest.raises(Interrupt):
        family_run(tmp_path / "cut", clone_file, callback=stop_at(1, "trained"))
    assert calls[0] == 60
    calls[0] = 0
    resumed = family_run(tmp_path / "cut", clone_file)
    assert calls[0] == 60  # round 2 only
    for a, b in zip(whole.rounds, resumed.rounds, strict=True):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.labels, b.labels)
    one, two = whole.final_router.policy.state_dict(), resumed.final_router.policy.state_dict()
    assert all(th.equal(one[key], two[key]) for key in one)
    with pytest.raises(ConfigError, match="dagger.episodes_per_round: 2 on disk, 3 now"):
        run_dagger(dataclasses.replace(LOOP, episodes_per_round=3), spec=FAMILY, bc=TINY_BC,
                   ppo=PPO, out=tmp_path / "cut", initial_policy=clone_file)


# ------------------------------------------------------------------------------ the job
TINY_JOB = [
    "--ppo-requests", "256", "--demo-steps", "128", "--bc-epochs", "1", "--no-progress",
    "--set", "warm_start.demo_episode_requests=32",
    "--set", "warm_start.demo_candidates=[least_added_time, lor]",
    "--set", "family_overrides={replicas: [2, 3], replica_slots: 4, episode_requests: 32, "
             "gpus: {a100: 1.0}, mixed_gpus: 0.0, capacity_requests: 50}",
    "--set", "dagger={teacher: least_added_time, rounds: 1, episodes_per_round: 2, "
             "episode_requests: 24, epochs: 1}",
    "--set", "evaluation.episodes=1", "--set", "evaluation.episode_requests=24",
    "--set", "evaluation.routers=[lor]", "--set", "stabilization.stabilization_steps=64",
    "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=64", "--set", "ppo.n_envs=2",
    "--set", "ppo.set_embed_dim=8", "--set", "ppo.set_hidden_dim=8",
]


def test_the_job_distils_and_ppo_starts_from_the_distilled_policy(tmp_path, monkeypatch):
    from sb3_warmstart.pipeline import runner, warm_start_stage
    from sb3_warmstart.policies.policy_file import load_pretrained
    from sb3_warmstart.warmstart.demo_store import load_demonstrations

    sessions = []
    build = runner.build_session
    monkeypatch.setattr(runner, "build_session",
                        lambda config, pretrained: sessions.append(build(config, pretrained))
                        or sessions[-1])
    out = tmp_path / "run"
    summary = warmstart.main([*TINY_JOB, "--output-dir", str(out)])
    assert summary["finished"]
    distilled = out / "pretrained" / "distilled_policy.zip"
    assert distilled.is_file() and (out / "pretrained" / "bc_policy.zip").is_file()
    assert (out / "pretrained" / "dagger" / "round_1.npz").is_file()
    assert any((out / "tensorboard" / "dagger").iterdir())
    rounds = summary["dagger"]["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["states"] == 48
    assert 0.0 <= rounds[0]["agreement"] <= 1.0 and rounds[0]["aggregate_states"] == 48
    assert json.loads((out / "report" / "summary.json").read_text())["dagger"] == summary["dagger"]

    (session,) = sessions
    assert session.extra["warm_start"] == str(distilled)
    model, meta, _ = load_pretrained(distilled)
    reference = session.model.reference_policy.state_dict()
    for key, value in model.policy.state_dict().items():
        assert th.equal(reference[key], value), key
    assert meta["return_normalization"] is not None  # the clone's, kept for PPO's normaliser

    calls = [0]  # distilling again on the finished folder labels nothing
    select = LeastAddedTimeRouter.select
    monkeypatch.setattr(LeastAddedTimeRouter, "select",
                        lambda router, view: calls.__setitem__(0, calls[0] + 1)
                        or select(router, view))
    config = load_config(warmstart.DEFAULT_CONFIG, overrides=_overrides())
    clone = warm_start_stage.Pretrained(None, None, None,
                                        str(out / "pretrained" / "bc_policy.zip"), {})
    demos, _ = load_demonstrations(out / "demos")
    again = warm_start_stage.distill(config, out, clone, demos)
    assert calls[0] == 0 and again.source == str(distilled)


def _overrides():
    parser = warmstart.build_parser()
    return warmstart.overrides_from_args(parser.parse_args(TINY_JOB), parser)
