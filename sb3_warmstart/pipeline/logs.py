"""SB3 logger outputs that continue across resumes with no lost and no duplicated row.

A resumed run restarts from its last checkpoint at env step ``S``. Everything logged after ``S``
by the interrupted process is about to be logged again, so:

* ``progress.csv`` (:class:`ResumableCSVOutputFormat`) keeps the rows up to ``S`` (by
  ``time/total_timesteps``), drops the later ones (and a half-written last line) and appends;
  stock SB3 opens it with ``"w+"`` and loses every earlier row;
* TensorBoard (:class:`ResumableTensorBoardOutputFormat`) opens its writer with
  ``purge_step=S + 1``: TensorBoard's own mechanism for a restart, which hides the events of
  the earlier files at steps after ``S``. TensorBoard reads a folder's event files in name
  order, and a name is ``events.out.tfevents.<unix second>.<host>.<pid>...``: a resume within
  the same second as the earlier writer could sort *before* it (by host or pid) and have its
  rows purged and shown first. The resumed writer therefore waits, at most a second or two,
  until its second is later than every existing file's (:func:`wait_for_a_later_second`).

Rows are values SB3 dumps once per rollout at ``step = num_timesteps``. Values recorded after a
dump and before the checkpoint (the ``train/`` metrics of the update that follows a rollout) are
carried in the checkpoint (:func:`sb3_warmstart.common.checkpoint.capture_state`), so the first row
after a resume is the row the uninterrupted run wrote.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from stable_baselines3.common.logger import (
    CSVOutputFormat,
    HumanOutputFormat,
    Logger,
    TensorBoardOutputFormat,
)
from torch.utils.tensorboard import SummaryWriter

from llm_cluster_env.atomic import atomic_write_text

STEP_KEY = "time/total_timesteps"
#: An event file's name and the unix second in it (TensorBoard's ``EventFileWriter`` naming).
EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
#: Longest wait (s) for a later second; beyond it (a file stamped in the future: clock skew)
#: the writer opens anyway and says so.
MAX_EVENT_FILE_WAIT_S = 2.0
logger = logging.getLogger(__name__)


def rows_up_to(path: Path, step: int) -> tuple[list[str], str]:
    """``(header keys, CSV text)`` of ``path`` keeping the rows with ``STEP_KEY <= step``.

    A row that does not parse (a line cut by ``kill -9``) and every row after it are dropped.
    """
    text = Path(path).read_text()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        return [], ""
    position = header.index(STEP_KEY) if STEP_KEY in header else None
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    complete = text.endswith("\n")
    rows = list(reader)
    for i, row in enumerate(rows):
        if len(row) != len(header) or (i == len(rows) - 1 and not complete):
            break
        try:
            row_step = float(row[position]) if position is not None else None
        except ValueError:
            break
        if row_step is None or row_step > step:
            break
        writer.writerow(row)
    return header, out.getvalue()


class ResumableCSVOutputFormat(CSVOutputFormat):
    """SB3's CSV output, continuing an existing file from a resume step.

    :param filename: the CSV file.
    :param resume_step: ``None`` for a new run (the file is created; it must not exist, so an
        earlier run's log is never overwritten), or the checkpoint's step: rows after it are
        dropped, new rows appended.
    """

    def __init__(self, filename: str, resume_step: int | None = None) -> None:
        path = Path(filename)
        if resume_step is None or not path.is_file():
            if path.exists():
                raise FileExistsError(f"{path}: a new run does not overwrite an earlier log")
            super().__init__(filename)
            return
        header, text = rows_up_to(path, resume_step)
        atomic_write_text(path, text)  # a crash here leaves the old file or the trimmed one
        self.file = open(path, "r+")  # SB3 rewrites the header in place when keys are added
        self.file.seek(0, os.SEEK_END)
        self.keys = list(header)
        self.separator = ","
        self.quotechar = '"'


def wait_for_a_later_second(folder: Path, clock: Callable[[], float] = time.time,
                            sleep: Callable[[float], None] = time.sleep,
                            max_wait_s: float = MAX_EVENT_FILE_WAIT_S) -> float:
    """Sleep until the unix second is later than that in every event file name in ``folder``,
    so a writer opened next sorts after them all. Returns the seconds waited (0 when no wait
    was needed, or when it would exceed ``max_wait_s``: then a warning names the file)."""
    stamps = [(int(m.group(1)), p.name) for p in Path(folder).glob("events.out.tfevents.*")
              if (m := EVENT_FILE.match(p.name))]
    if not stamps:
        return 0.0
    latest, name = max(stamps)
    wait = latest + 1 - clock()
    if wait <= 0:
        return 0.0
    if wait > max_wait_s:
        logger.warning("%s is stamped %.1f s in the future (clock skew?); TensorBoard may show "
                       "the resumed run's events out of order", Path(folder) / name, wait - 1)
        return 0.0
    sleep(wait)
    return wait


class ResumableTensorBoardOutputFormat(TensorBoardOutputFormat):
    """SB3's TensorBoard output; when resuming from step ``S``, events the earlier process
    wrote after ``S`` are purged (``SummaryWriter(purge_step=S + 1)``), and the new event file
    is named to sort after the earlier ones (:func:`wait_for_a_later_second`).

    :param folder: the event folder. :param resume_step: the checkpoint's step, or ``None``.
    """

    def __init__(self, folder: str, resume_step: int | None = None) -> None:
        if resume_step is not None and Path(folder).is_dir():
            wait_for_a_later_second(Path(folder))
        self.writer = SummaryWriter(log_dir=folder, purge_step=None if resume_step is None
                                    else int(resume_step) + 1)
        self._is_closed = False


def make_run_logger(run_dir: Path, resume_step: int | None) -> Logger:
    """The PPO logger of a run folder: ``ppo_training.log`` (appended), ``progress.csv`` and
    ``tensorboard/``, continued from ``resume_step`` when resuming."""
    run_dir = Path(run_dir)
    formats = [HumanOutputFormat(open(run_dir / "ppo_training.log", "a")),
               ResumableCSVOutputFormat(str(run_dir / "progress.csv"), resume_step),
               ResumableTensorBoardOutputFormat(str(run_dir / "tensorboard"), resume_step)]
    return Logger(str(run_dir), formats)
