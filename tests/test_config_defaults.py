"""One default per knob: the config dataclasses hold every default; no component restates one.

A component parameter named like a config field is the same knob, so it must not carry a
default of its own (it would drift from the config's, as ``max_temperature`` 3.0 vs 2.0 and
``min_lr_ratio`` 0.0 vs 0.1 once did). Components take their config object instead.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytestmark = pytest.mark.train

from sb3_warmstart.algorithms import callbacks, ppo, schedules  # noqa: E402
from sb3_warmstart.common import checkpoint, normalize  # noqa: E402
from sb3_warmstart.pipeline import config, envs, ppo_stage, warm_start_stage  # noqa: E402
from sb3_warmstart.warmstart import bc, cloning, demo_collect, demo_plan  # noqa: E402

#: Sections that are not knobs: the environment's own config (given as a mapping).
SECTIONS_GIVEN_WHOLE = {"env_kwargs"}


def config_fields() -> set[str]:
    """The knobs: every leaf field of every config dataclass (nested sections walked, the
    sections themselves -- ``kl``, ``ppo``... -- are not knobs)."""
    names: set[str] = set()
    todo = [config.TrainingConfig]
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            hint = cls.__dataclass_fields__[f.name].type
            sub = getattr(config, str(hint), None)
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                todo.append(sub)
            elif f.name not in SECTIONS_GIVEN_WHOLE:
                names.add(f.name)
    return names


#: The components that read configuration, and what they are called.
COMPONENTS = {
    "KLRegularisedMixin": ppo.KLRegularisedMixin.__init__,
    "TemperatureController": callbacks.TemperatureController.__init__,
    "NormalizerStabilization": callbacks.NormalizerStabilization.__init__,
    "TrainingMonitor": callbacks.TrainingMonitor.__init__,
    "PeriodicCheckpoint": checkpoint.PeriodicCheckpoint.__init__,
    "CheckpointManager": checkpoint.CheckpointManager.__init__,
    "build_lr_scheduler": schedules.build_lr_scheduler,
    "EntropyCoefficient": schedules.EntropyCoefficient.__init__,
    "SequenceBC": bc.SequenceBC.__init__,
    "clone_demonstrations": cloning.clone_demonstrations,
    "collect_demonstrations": demo_collect.collect_demonstrations,
    "plan_collection": demo_plan.plan_collection,
    "fit_return_normalizer": normalize.fit_return_normalizer,
    "make_training_venv": envs.make_training_venv,
    "build_session": ppo_stage.build_session,
    "make_model": ppo_stage.make_model,
    "demonstrations": warm_start_stage.demonstrations,
    "clone": warm_start_stage.clone,
}
#: Names shared with a config field that are not that knob (documented here, on purpose).
NOT_THE_SAME_KNOB = {
    ("TrainingMonitor", "verbose"), ("TemperatureController", "verbose"),
    ("NormalizerStabilization", "verbose"), ("PeriodicCheckpoint", "verbose"),
}


def test_config_fields_are_found():
    fields = config_fields()
    assert {"kl_ref_coef_initial", "max_temperature", "min_lr_ratio", "epochs",
            "checkpoint_interval", "accumulation_steps"} <= fields


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_no_component_restates_a_config_default(name):
    fields = config_fields()
    second_defaults = [
        f"{p.name}={p.default!r}"
        for p in inspect.signature(COMPONENTS[name]).parameters.values()
        if p.name in fields and p.default is not inspect.Parameter.empty
        and (name, p.name) not in NOT_THE_SAME_KNOB]
    assert not second_defaults, (f"{name} has its own default for config knob(s) "
                                 f"{second_defaults}: take it from the config instead")


def test_every_knob_has_exactly_one_default_in_the_configs():
    """A field name used by two config sections is two knobs; each has one default."""
    seen: dict[tuple[str, str], object] = {}
    todo = [config.TrainingConfig]
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            key = (cls.__name__, f.name)
            assert key not in seen
            seen[key] = f.default
            sub = getattr(config, str(cls.__dataclass_fields__[f.name].type), None)
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                todo.append(sub)
    assert ("TemperatureConfig", "max_temperature") in seen


def test_components_use_the_config_values():
    """The values the defaults used to disagree on now come from one place."""
    temperature = callbacks.TemperatureController(config.TemperatureConfig())
    assert temperature.config.max_temperature == config.TemperatureConfig().max_temperature == 2.0
    kl = config.KLConfig()
    assert kl.kl_ref_coef_initial == 0.5
    schedule = config.LearningRateScheduleConfig(type="cosine_annealing_with_warmup")
    import torch

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedules.build_lr_scheduler(optimizer, schedule)
    assert scheduler.eta_min == pytest.approx(schedule.min_lr_ratio) == pytest.approx(0.1)


def test_class_names_are_unique_and_do_not_reuse_sb3_names():
    import ast
    from pathlib import Path

    import stable_baselines3.common.callbacks as sb3_callbacks

    package = Path(config.__file__).parent
    names: dict[str, str] = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.name not in names, (f"class {node.name} in {path.name} and "
                                                f"{names[node.name]}")
                names[node.name] = path.name
    library = {name for name in dir(sb3_callbacks) if isinstance(getattr(sb3_callbacks, name),
                                                                 type)}
    assert not (set(names) & library), set(names) & library


@pytest.mark.slow
def test_loading_a_policy_does_not_import_the_bc_trainer():
    import subprocess
    import sys

    code = ("import sys, sb3_warmstart.policies.policy_file, sb3_warmstart.policies.run_loading,"
            " sb3_warmstart.policies.router, sb3_warmstart.common.normalize;"
            "print('sb3_warmstart.warmstart.bc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------ side CLIs
SIDE_CLIS = ("collect_demos", "pretrain", "evaluate")


@pytest.mark.parametrize("script", SIDE_CLIS)
def test_side_cli_flags_hold_no_default_of_a_config_knob(script):
    """A flag named like a config knob defaults to ``None`` (= the dataclass's value)."""
    from conftest import load_script

    parser = load_script(script).build_parser()
    fields = config_fields() | {f"imbalance_{f.name}"
                                for f in dataclasses.fields(demo_plan.ImbalanceSpec)}
    restated = [f"--{a.dest}={a.default!r}" for a in parser._actions
                if a.dest in fields and a.default is not None]
    assert not restated, f"train/{script}.py restates config default(s) {restated}"


def test_collect_demos_resolves_the_main_jobs_config_and_imbalance_defaults(tmp_path):
    from conftest import load_script

    from sb3_warmstart.pipeline.warm_start_stage import demo_env_config

    cli = load_script("collect_demos")
    job = cli.parse_args(["--output", str(tmp_path / "out")])
    main_job = config.load_config(None, overrides={"family": None})
    assert job.config == main_job and job.imbalance is None
    assert demo_env_config(job.config).episode_requests == \
        config.WarmStartConfig().demo_episode_requests
    job = cli.parse_args(["--imbalance", "--output", str(tmp_path / "out")])
    assert job.imbalance == demo_plan.ImbalanceSpec()
    job = cli.parse_args(["--imbalance", "--imbalance-high", "2", "--output",
                          str(tmp_path / "out")])
    assert job.imbalance == demo_plan.ImbalanceSpec(high_factor=2.0)


def test_evaluate_resolves_the_reports_evaluation_config():
    from conftest import load_script

    cli = load_script("evaluate")
    args = cli.build_parser().parse_args(["--model", "x"])
    assert cli.evaluation_config(args) == config.EvaluationConfig()
    args = cli.build_parser().parse_args(["--model", "x", "--routers", "lor", "--episodes", "2"])
    assert cli.evaluation_config(args) == config.EvaluationConfig(episodes=2, routers=("lor",))


def test_a_setting_added_later_at_the_old_behaviour_leaves_the_identity_unchanged():
    """Runs saved before ``warm_start.demo_objective`` existed trained with mean-E2E
    demonstrations: at that value the setting is not in the identity (so they, their
    checkpoints and DAgger rounds still match); at ``mean_ttft`` it is another run."""
    from sb3_warmstart.pipeline.config import (
        ADDED_SETTINGS,
        identity_differences,
        load_config,
    )

    assert ADDED_SETTINGS["warm_start.demo_objective"] == "mean_e2e"
    current = load_config(None).training_identity()
    assert "demo_objective" not in current["warm_start"]
    assert "demo_objective" in load_config(None).to_dict()["warm_start"]
    ttft = load_config(None, overrides={"warm_start": {"demo_objective": "mean_ttft"}})
    assert identity_differences(current, ttft.training_identity()) == [
        "warm_start.demo_objective: '<absent>' -> 'mean_ttft'"]
