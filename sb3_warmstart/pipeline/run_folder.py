"""A run folder belongs to one training run: its identity, its lock, and where a run goes.

``run.json`` records the run's *training identity* (:meth:`TrainingConfig.training_identity`:
the resolved config less the sections that only say how the run is kept and reported). A later
invocation resumes the folder only when its identity is equal; any other change (seed,
hyperparameters, environment, budget) is another run:

* with the default folder (``runs/<profile>``) it goes to the first of ``runs/<profile>-2``,
  ``-3``, ... that holds the same run or nothing yet, and says so;
* with an explicit ``--output-dir``, or with ``--strict-resume``, it is refused, naming every
  setting that differs.

While a run works in a folder it holds an exclusive lock on ``<folder>/.lock`` (``filelock``:
an OS lock, released by the kernel even after ``kill -9``); a second run into the same folder
stops at once with a message naming the holder.

Starting a run afresh in a folder that has outputs (``--resume warmstart``) first moves them
into ``previous-<time>/``: nothing an earlier run wrote is overwritten or mixed into the new
run's logs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.pipeline.config import TrainingConfig, identity_differences

IDENTITY_FILE = "run.json"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
IDENTITY_FORMAT = 1
#: What one run writes into its folder (moved aside together when a run starts afresh).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "progress.csv", "training_history.csv",
               "training_progress.json", "final_model.zip", "final_vecnormalize.pkl", "report",
               IDENTITY_FILE)


class RunFolderError(RuntimeError):
    """The run cannot use the folder (another run's settings, or locked by another process)."""


def read_identity(folder: Path) -> dict[str, Any] | None:
    """The training identity recorded in ``folder`` (``None`` if it records none)."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["training"])
    except (ValueError, KeyError, TypeError):
        return {"unreadable": str(path)}


def write_identity(folder: Path, config: TrainingConfig) -> None:
    atomic_write_json(Path(folder) / IDENTITY_FILE,
                      {"format": IDENTITY_FORMAT, "training": config.training_identity()})


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def has_outputs(folder: Path) -> bool:
    """Whether ``folder`` holds anything an earlier run wrote (empty directories do not
    count)."""
    return any(_present(Path(folder) / name) for name in RUN_OUTPUTS)


def folder_differences(folder: Path, config: TrainingConfig) -> list[str] | None:
    """``None`` when ``config`` may use ``folder`` (same run, or nothing there yet); else the
    settings that differ from the run the folder holds."""
    folder = Path(folder)
    saved = read_identity(folder)
    if saved is None:
        if has_outputs(folder):
            return [f"{folder} holds outputs of a run without {IDENTITY_FILE} (an earlier "
                    "version of this tool), so it cannot be told apart from another run"]
        return None
    differences = identity_differences(saved, config.training_identity())
    return differences or None


def choose_run_folder(requested: Path | None, default: Path, config: TrainingConfig, *,
                      strict: bool) -> tuple[Path, str | None]:
    """The folder this run uses and, when it is not the one asked for, why.

    :param requested: ``--output-dir`` (``None`` when not given).
    :param default: ``runs/<profile>``.
    :param strict: ``--strict-resume``: refuse rather than move to another folder.
    :raises RunFolderError: the folder holds another run and may not be replaced.
    """
    folder = Path(requested) if requested is not None else Path(default)
    differences = folder_differences(folder, config)
    if differences is None:
        return folder, None
    listed = "\n  ".join(differences)
    if requested is not None or strict:
        flag = "--strict-resume" if strict else f"--output-dir {folder}"
        raise RunFolderError(
            f"{flag}: {folder} holds a run with other settings, which this run would not "
            f"continue:\n  {listed}\nRun with the earlier settings to resume it, or choose "
            "another --output-dir for a new run.")
    index = 2
    while True:
        candidate = folder.with_name(f"{folder.name}-{index}")
        if folder_differences(candidate, config) is None:
            return candidate, (f"{folder} holds a run with other settings ({'; '.join(differences)}); "
                               f"this run uses {candidate}")
        index += 1


def archive_outputs(folder: Path) -> Path | None:
    """Move an earlier run's outputs into ``folder/previous-<time>/``; returns that folder."""
    folder = Path(folder)
    present = [name for name in RUN_OUTPUTS if _present(folder / name)]
    if not present:
        return None
    target = folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    target.mkdir()
    for name in present:
        os.rename(folder / name, target / name)
    return target


class RunLock:
    """An exclusive lock on a run folder for the lifetime of a run.

    :param folder: the run folder (created if needed).
    :param command: the command line, shown to a second run that finds the folder locked.
    """

    def __init__(self, folder: Path, command: str = "") -> None:
        self.folder = Path(folder)
        self.command = command or " ".join(sys.argv)
        self._lock = FileLock(str(self.folder / LOCK_FILE), timeout=0)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            owner = ""
            try:
                info = json.loads((self.folder / OWNER_FILE).read_text())
                owner = (f" (pid {info['pid']} on {info['host']}, since {info['since']}: "
                         f"{info['command']})")
            except (OSError, ValueError, KeyError, TypeError):
                pass
            raise RunFolderError(
                f"{self.folder} is in use by another training run{owner}; wait for it to "
                "finish, or choose another --output-dir") from None
        atomic_write_json(self.folder / OWNER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": self.command})

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
