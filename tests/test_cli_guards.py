"""Entry points never replace what they did not write: an export, a pretrained checkpoint or a
demonstration option that would land on someone else's file is refused by name, and the file
is left as it was."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.train

from conftest import load_script  # noqa: E402

from sb3_warmstart.export import ExportError, export_router  # noqa: E402


def test_export_refuses_to_replace_a_folder_that_is_not_an_earlier_export(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_model.zip").write_bytes(b"the run's model")
    with pytest.raises(ExportError, match=r"run: an existing folder without schema.json"):
        export_router(tmp_path / "nowhere", run)
    assert (run / "final_model.zip").read_bytes() == b"the run's model"
    assert sorted(p.name for p in run.iterdir()) == ["final_model.zip"]


def test_export_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not an export folder"):
        export_router(tmp_path / "nowhere", target)
    assert target.read_text() == "keep me"


def test_pretrain_refuses_an_output_that_is_not_an_earlier_checkpoint(tmp_path, capsys):
    pretrain = load_script("pretrain")
    demos = tmp_path / "demos"
    demos.mkdir()
    model = tmp_path / "final_model.zip"
    model.write_bytes(b"a run's final model")
    with pytest.raises(SystemExit) as stop:
        pretrain.parse_args(["--demo", str(demos), "--output", str(model)])
    assert stop.value.code == 2
    assert "--output=" in capsys.readouterr().err
    assert model.read_bytes() == b"a run's final model"


def test_collect_demos_refuses_imbalance_options_without_imbalance(capsys):
    collect = load_script("collect_demos")
    with pytest.raises(SystemExit) as stop:
        collect.parse_args(["--output", "unused", "--imbalance-high-factor", "2.0"])
    assert stop.value.code == 2
    assert ("--imbalance-high-factor=2.0: only used with --imbalance"
            in capsys.readouterr().err)
