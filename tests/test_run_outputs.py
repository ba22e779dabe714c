"""Run-folder pieces on their own: identity and lock, resumable CSV, progress lines, plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.train

from llm_cluster_env.tools.evaluation import RouterResult, plot_latency_cdf  # noqa: E402
from sb3_warmstart.pipeline import run_folder  # noqa: E402
from sb3_warmstart.pipeline.config import TrainingConfig, load_config  # noqa: E402
from sb3_warmstart.pipeline.logs import (  # noqa: E402
    ResumableCSVOutputFormat,
    ResumableTensorBoardOutputFormat,
    rows_up_to,
    wait_for_a_later_second,
)
from sb3_warmstart.pipeline.progress import ProgressPrinter  # noqa: E402
from sb3_warmstart.pipeline.report import plot_learning_curve, relative_to_reference  # noqa: E402


# ------------------------------------------------------------------------- identity, lock
def test_identity_ignores_run_only_sections_and_names_every_difference(tmp_path):
    base = TrainingConfig()
    run_folder.write_identity(tmp_path, base)
    same_run = base.with_overrides({"checkpointing": {"checkpoint_interval": 8192},
                                    "evaluation": {"episodes": 5}})
    assert run_folder.folder_differences(tmp_path, same_run) is None
    other = base.with_overrides({"seed": 3, "kl": {"kl_coef": 0.2}})
    assert run_folder.folder_differences(tmp_path, other) == ["seed: 0 -> 3",
                                                              "kl.kl_coef: 0.1 -> 0.2"]


def test_choose_folder_moves_a_default_run_aside_and_refuses_an_explicit_one(tmp_path):
    default = tmp_path / "runs" / "default"
    run_folder.write_identity(default, TrainingConfig())
    other = TrainingConfig().with_overrides({"seed": 5})
    folder, note = run_folder.choose_run_folder(None, default, other, strict=False)
    assert folder == tmp_path / "runs" / "default-2" and "seed: 0 -> 5" in note
    run_folder.write_identity(folder, other)  # that run starts there...
    assert run_folder.choose_run_folder(None, default, other, strict=False)[0] == folder
    with pytest.raises(run_folder.RunFolderError, match="(?s)--output-dir .*seed: 0 -> 5"):
        run_folder.choose_run_folder(default, default, other, strict=False)
    with pytest.raises(run_folder.RunFolderError, match="--strict-resume"):
        run_folder.choose_run_folder(None, default, other, strict=True)
    assert run_folder.choose_run_folder(default, default, TrainingConfig(), strict=True) == (
        default, None)


def test_lock_is_exclusive_and_released(tmp_path):
    first = run_folder.RunLock(tmp_path, "first command")
    first.acquire()
    owner = json.loads((tmp_path / run_folder.OWNER_FILE).read_text())
    assert owner["command"] == "first command"
    first.release()
    assert not (tmp_path / run_folder.OWNER_FILE).exists()
    with run_folder.RunLock(tmp_path):  # free again
        pass


def test_archive_moves_outputs_into_previous_and_keeps_them_whole(tmp_path):
    (tmp_path / "progress.csv").write_text("a\n1\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{}")
    (tmp_path / "demos").mkdir()  # reusable: stays
    assert run_folder.has_outputs(tmp_path)
    moved = run_folder.archive_outputs(tmp_path)
    assert moved.name.startswith("previous-") and (moved / "progress.csv").read_text() == "a\n1\n"
    assert (moved / "checkpoints" / "latest.json").is_file() and (tmp_path / "demos").is_dir()
    assert not run_folder.has_outputs(tmp_path)


def test_profile_without_config_reads_the_profiles_file():
    from conftest import load_script

    warmstart = load_script("warmstart")
    out = warmstart.main(["--profile", "heterogeneous", "--print-config"])
    assert out["config"]["env_kwargs"]["scenario"] == "heterogeneous"
    assert out["config"]["temperature"]["max_temperature"] == 3.0
    with pytest.raises(Exception, match="profiles live in a config file"):
        load_config(None, "heterogeneous")


# ------------------------------------------------------------------------------- CSV log
def test_resumed_csv_keeps_rows_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("time/total_timesteps,x\n128,1\n256,2\n384,3\n51")  # killed mid-line
    header, text = rows_up_to(path, 256)
    assert header == ["time/total_timesteps", "x"]
    assert text == "time/total_timesteps,x\n128,1\n256,2\n"
    writer = ResumableCSVOutputFormat(str(path), resume_step=256)
    writer.write({"time/total_timesteps": 384, "x": 30, "y": 7}, {"time/total_timesteps": (),
                                                                 "x": (), "y": ()})
    writer.close()
    assert path.read_text() == ("time/total_timesteps,x,y\n128,1,\n256,2,\n384,30,7\n")


def test_a_new_run_never_overwrites_an_existing_csv_log(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("old\n")
    with pytest.raises(FileExistsError):
        ResumableCSVOutputFormat(str(path), resume_step=None)
    assert path.read_text() == "old\n"


# ------------------------------------------------------------------------- progress lines
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_resumed_event_file_waits_for_a_later_second_than_every_earlier_file(tmp_path, caplog):
    (tmp_path / "events.out.tfevents.1000.host.99.0").touch()
    (tmp_path / "events.out.tfevents.0999.host.7.0").touch()
    (tmp_path / "notes.txt").touch()
    slept = []
    assert wait_for_a_later_second(tmp_path, clock=lambda: 1000.25, sleep=slept.append) == 0.75
    assert slept == [0.75]  # the next writer's name carries second 1001
    assert wait_for_a_later_second(tmp_path, clock=lambda: 1001.0, sleep=slept.append) == 0
    assert wait_for_a_later_second(tmp_path / "none", clock=lambda: 0.0, sleep=slept.append) == 0
    assert wait_for_a_later_second(tmp_path, clock=lambda: 990.0, sleep=slept.append) == 0
    assert slept == [0.75] and "stamped 10.0 s in the future" in caplog.text  # clock skew


def test_resumed_tensorboard_events_follow_the_earlier_ones_even_in_the_same_second(tmp_path):
    """An earlier writer whose name sorts after ours within a second (here: a larger pid, one
    second ahead) must still be read first, or TensorBoard shows the resumed rows first."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(log_dir=str(tmp_path))
    for step in (1, 2, 3):
        first.add_scalar("x", float(step), step)
    first.close()
    (old,) = tmp_path.glob("events.out.tfevents.*")
    second = int(time.time()) + 1
    old.rename(tmp_path / f"events.out.tfevents.{second:010d}.host.99999999.0")
    resumed = ResumableTensorBoardOutputFormat(str(tmp_path), resume_step=2)
    resumed.writer.add_scalar("x", 30.0, 3)
    resumed.writer.add_scalar("x", 40.0, 4)
    resumed.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert names[0].startswith(f"events.out.tfevents.{second:010d}.host.99999999")
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("x")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_piped_progress_prints_plain_lines_at_least_every_interval():
    stream, clock = io.StringIO(), FakeClock()
    printer = ProgressPrinter("ppo", 1000, "steps", stream=stream, clock=clock, interval_s=10)
    assert stream.getvalue() == "[ppo] 0/1,000 steps (0%)\n"  # at once
    for step in range(1, 1001):
        clock.now = step * 0.1  # 100 s in all
        printer.update(step, "recent training episodes: mean E2E 5.00 s")
    printer.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 9 + 1  # start, one per 10 s while running, end
    assert [line.split("/")[0] for line in lines[1:10]] == [
        f"[ppo] {100 * i}" for i in range(1, 10)]  # one every 10 s of the fake clock
    assert lines[1] == ("[ppo] 100/1,000 steps (10%), 10 steps/s, ~90 s left; "
                        "recent training episodes: mean E2E 5.00 s")
    assert lines[-1].startswith("[ppo] 1,000/1,000 steps (100%) in 100.0 s")
    assert "\r" not in stream.getvalue()  # no bar redraws in a log


def test_progress_can_be_silenced():
    stream = io.StringIO()
    printer = ProgressPrinter("BC", 5, "epochs", stream=stream, enabled=False)
    printer.update(5)
    printer.close()
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------- plots
def _result(name: str, rng: np.random.Generator) -> RouterResult:
    result = RouterResult(name)
    result.e2e.append(rng.lognormal(1.0, 0.5, 200))
    result.episodes.append({"e2e_mean": 1.0})
    return result


def test_latency_cdf_gives_every_one_of_14_routers_its_own_style(tmp_path, rng):
    results = {f"router_{i}": _result(f"router_{i}", rng) for i in range(14)}
    fig = plot_latency_cdf(results, tmp_path / "cdf.png", title="14 routers")
    lines = fig.axes[0].get_lines()
    styles = {(tuple(np.round(np.asarray(line.get_color(), float), 4)), line.get_linestyle())
              for line in lines}
    assert len(lines) == 14 and len(styles) == 14
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_learning_curve_pairs_each_episode_with_lor_on_the_same_seed(tmp_path):
    rows = [{"kind": "episode", "num_timesteps": 512 * (i // 2 + 1), "episode_seed": 100 + i,
             "e2e_mean": 5.0 * (1.10 if i < 4 else 1.01)} for i in range(16)]
    lor = {100 + i: 5.0 for i in range(16)}
    paired = relative_to_reference(rows, lor)
    assert [round(r["vs_reference_pct"], 6) for r in paired[:5]] == [10.0] * 4 + [1.0]
    summary = plot_learning_curve(rows, tmp_path / "curve.png", lor_by_seed=lor,
                                  stabilization_steps=1024, note="what the points are")
    assert summary == {"last_quarter_vs_lor_pct": pytest.approx(1.0),
                       "curve_episodes_shown": 16, "curve_episodes_total": 16}
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert relative_to_reference([{"num_timesteps": 1, "e2e_mean": 1.0}], lor) == []


def test_rerun_does_not_rewrite_a_config_of_another_run(tmp_path):
    """The identity check happens before anything is written (see also test_pipeline)."""
    path = Path(tmp_path)
    run_folder.write_identity(path, TrainingConfig())
    before = (path / run_folder.IDENTITY_FILE).read_text()
    with pytest.raises(run_folder.RunFolderError):
        run_folder.choose_run_folder(path, path, TrainingConfig(seed=1), strict=False)
    assert (path / run_folder.IDENTITY_FILE).read_text() == before
