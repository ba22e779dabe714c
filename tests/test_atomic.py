"""Atomic writes: whole files or nothing, with the permissions an ordinary open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text, make_temporary_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_uses_the_umask_not_0600(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "report.md", "# report\n")
    assert _mode(path) == 0o644
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(path) == _mode(plain)  # the same as any other file the user writes
    atomic_write_json(path, {"replaced": True})  # replacing keeps the rule
    assert _mode(path) == 0o644 and path.read_text().strip().startswith("{")


def test_temporary_dirs_use_the_umask_not_0700(tmp_path, umask_022):
    path = make_temporary_dir(tmp_path, ".demos.tmp-")
    assert path.is_dir() and path.parent == tmp_path and path.name.startswith(".demos.tmp-")
    assert _mode(path) == 0o755
    assert make_temporary_dir(tmp_path, ".demos.tmp-") != path
