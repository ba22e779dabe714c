"""The main job: demos -> behaviour cloning (or an external checkpoint) -> DAgger toward a
teacher better than the heuristics (``dagger`` section) -> PPO with KL regularisation toward
the distilled policy and temperature control -> evaluation and report.

:class:`WarmStartPipeline` only orchestrates; each stage is a function or small object that
runs alone: :mod:`sb3_warmstart.pipeline.warm_start_stage` (demonstrations, cloning, DAgger,
external models),
:mod:`sb3_warmstart.pipeline.ppo_stage` (session, resume, training), :mod:`sb3_warmstart.pipeline.report`.
``train/warmstart.py`` is its command line. A stage runs only when needed: demonstrations and
the clone are reused from the run folder when their settings match (``--force-warmstart``
redoes them), and DAgger resumes at its first unfinished round; resuming a PPO run skips all
three (the reference policy lives in the checkpoint); a finished run, run again, is only
re-evaluated: ``report/`` is rewritten and nothing else (the model, checkpoints, logs and
records are left as they are).

A run folder belongs to one run (:mod:`sb3_warmstart.pipeline.run_folder`: identity, lock). Run folder::

    run.json                 the run's training identity (what a resume must match)
    config.yaml              resolved configuration (loadable with --config)
    command.txt              the command line, one line per invocation
    ppo_training.log         pipeline log and SB3's training tables
    tensorboard/             TensorBoard events (train/, rollout/, episode/, temperature/ ...;
                             the warm start's stages as the runs demos/, bc/, dagger/)
    progress.csv             SB3's CSV log;  training_history.csv  the monitor's rows
    demos/                   imitation trajectories + stats.json
    pretrained/              bc_policy.zip (clone) or external.zip (copied, validated);
                             dagger/ (the DAgger rounds: labels, policies) and
                             distilled_policy.zip (its last round: what PPO starts from)
    checkpoints/             step_<n>/ directories and latest.json
    training_progress.json   the chunks completed (chunk mode) and the run status
    final_model.zip, final_vecnormalize.pkl (and .json: the statistics without pickles)
    report/                  results table (txt/csv/json), report.md, PNG plots
    previous-<time>/         an earlier run's outputs, moved aside by --resume warmstart
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch as th

from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.common.checkpoint import CheckpointError, CheckpointManager, TrainingSession
from sb3_warmstart.pipeline import run_folder, warm_start_stage
from sb3_warmstart.pipeline.config import TrainingConfig, dump_config, load_config
from sb3_warmstart.pipeline.ppo_stage import (
    PPOTrainer,
    TrainingInterrupted,
    build_session,
    resume_session,
)
from sb3_warmstart.pipeline.warm_start_stage import Pretrained, WarmStartError, settings_hash

log = logging.getLogger("sb3_warmstart.pipeline.runner")

ResumeChoice = Literal["ask", "checkpoint", "warmstart", "external"]
PROGRESS_FILE = "training_progress.json"

__all__ = ["PipelineError", "RunOptions", "TrainingInterrupted", "WarmStartPipeline"]


class PipelineError(RuntimeError):
    """The run cannot proceed (a refused resume prompt, a folder holding another run, a
    checkpoint that does not fit with ``--strict-resume``, an invalid external checkpoint...)."""


@dataclass
class RunOptions:
    """How to run (from the command line), as opposed to what to train (the config).

    :param output_dir: the run folder.
    :param output_dir_given: whether the user named it (``--output-dir``); a default folder
        that holds another run is replaced by a fresh sibling instead of being refused.
    :param resume: what to do when a checkpoint exists (see :meth:`WarmStartPipeline.decide`).
    :param strict_resume: refuse rather than start fresh when the folder or its checkpoint
        belongs to other settings.
    :param force_warmstart: collect demos and clone again even if the run folder has them.
    :param chunk_mode: train in chunks of ``chunk_size`` env steps, checkpointing after each.
    :param chunk_size: env steps per chunk.
    :param max_chunks: stop this invocation after this many chunks (the next invocation of the
        same command continues); ``None`` = run to the budget.
    :param progress: progress bars (terminal) or progress lines (piped output).
    :param command: the command line, recorded in the run folder.
    :param prompt: asks the operator a question (``input`` by default; tests inject).
    :param interactive: whether a terminal is attached (``sys.stdin.isatty`` by default).
    """

    output_dir: Path
    output_dir_given: bool = True
    resume: ResumeChoice = "ask"
    strict_resume: bool = False
    force_warmstart: bool = False
    chunk_mode: bool = False
    chunk_size: int | None = None
    max_chunks: int | None = None
    progress: bool = True
    command: list[str] = field(default_factory=list)
    prompt: Callable[[str], str] = input
    interactive: Callable[[], bool] = field(default=lambda: sys.stdin.isatty())


class WarmStartPipeline:
    """Runs one training job; :meth:`run` reads like the list of stages.

    :param config: what to train. :param options: how to run it.
    """

    def __init__(self, config: TrainingConfig, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.run_dir = Path(options.output_dir)
        self.timings: dict[str, float] = {}
        self.session: TrainingSession | None = None
        self.pretrained: Pretrained | None = None
        self.stage = "setup"
        self.finished = False
        self.log_buffer: logging.handlers.MemoryHandler | None = None

    # ================================================================ the job
    def run(self) -> dict[str, Any]:
        """The whole job; returns the report summary (``{"finished": False, ...}`` when
        ``--max-chunks`` stopped it early)."""
        start = time.perf_counter()
        th.set_num_threads(1)
        if self.config.warm_start.external_pretrain:
            self._check_external()  # before the run folder is touched
        self._check_teacher()
        self.run_dir = self.choose_folder()
        lock = run_folder.RunLock(self.run_dir, " ".join(self.options.command))
        try:
            lock.acquire()
        except run_folder.RunFolderError as err:
            raise PipelineError(str(err)) from None
        try:
            self.log_buffer = _configure_logging()
            manager, checkpoint = self.find_checkpoint()
            decision = self.decide(checkpoint)
            summary = None
            if decision == "resume" and self.already_finished(manager, checkpoint):
                summary = self.re_evaluate(manager, checkpoint)
            if summary is None:
                summary = self.train_and_report(manager, checkpoint, decision)
            if not self.finished:
                return summary
        finally:
            lock.release()
        self.timings["total_s"] = time.perf_counter() - start
        summary["timings"] = self.timings
        dagger = warm_start_stage.stored_dagger_summary(self.run_dir)
        if dagger is not None:
            summary["dagger"] = dagger
        summary["finished"] = True
        atomic_write_json(self.run_dir / "report" / "summary.json", summary)
        log.info("done in %.1f s; report in %s", self.timings["total_s"], self.run_dir / "report")
        return summary

    def train_and_report(self, manager: CheckpointManager, checkpoint: Path | None,
                         decision: str) -> dict[str, Any]:
        """Record the run in its folder, start or resume it, train PPO, report."""
        self.prepare()
        log.info("start: %s%s", decision, f" from {checkpoint}" if decision == "resume" else "")
        session = self.resume(manager, checkpoint) if decision == "resume" else None
        resumed = session is not None
        if session is None:
            manager = self.start_fresh(manager)
            self.pretrained = self.warm_start(self.decide(None) if decision == "resume"
                                              else decision)
            session = build_session(self.config, self.pretrained)
        self.session = session
        self.finished = self.train_ppo(manager, resumed=resumed)
        if not self.finished:
            return {"finished": False, "num_timesteps": int(session.model.num_timesteps)}
        return self.report()

    def already_finished(self, manager: CheckpointManager, checkpoint: Path | None) -> bool:
        """Whether the run in the folder reached its budget: the progress file says finished,
        the checkpoint to resume is at the budget and the final model is written."""
        if checkpoint is None or not (self.run_dir / "final_model.zip").is_file():
            return False
        steps = int(manager.verify(checkpoint)["num_timesteps"])
        return (self.read_progress().get("status") == "finished"
                and steps >= self.config.total_requests)

    def re_evaluate(self, manager: CheckpointManager, checkpoint: Path) -> dict[str, Any] | None:
        """A finished run: the report again from its final checkpoint. Only ``report/`` is
        written (the model, checkpoints, logs, demos and the run's records stay as they are).
        ``None`` when the checkpoint cannot be loaded (the caller resumes as usual)."""
        log.info("already finished; re-evaluating: %s reached its budget of %d env steps; only "
                 "%s is rewritten (to retrain from scratch: --resume warmstart)", self.run_dir,
                 self.config.total_requests, self.run_dir / "report")
        try:
            self.session = resume_session(self.config, manager, checkpoint)
        except CheckpointError as err:
            log.warning("%s; resuming instead", err)
            return None
        self.log_buffer = _stop_buffering(self.log_buffer, None)
        self.finished = True
        return self.report()

    # ================================================================ setup
    def _check_external(self) -> None:
        try:
            warm_start_stage.check_external(self.config)
        except WarmStartError as err:
            raise PipelineError(str(err)) from None

    def _check_teacher(self) -> None:
        """Refuse a DAgger teacher the training env cannot serve, before the folder is touched."""
        ws = self.config.warm_start
        if not ws.enabled or ws.skip_bc_training:
            return
        try:
            warm_start_stage.check_teacher(self.config)
        except WarmStartError as err:
            raise PipelineError(str(err)) from None

    def choose_folder(self) -> Path:
        """The folder of this run (:func:`sb3_warmstart.pipeline.run_folder.choose_run_folder`)."""
        try:
            folder, note = run_folder.choose_run_folder(
                self.run_dir if self.options.output_dir_given else None, self.run_dir,
                self.config, strict=self.options.strict_resume)
        except run_folder.RunFolderError as err:
            raise PipelineError(str(err)) from None
        if note:
            print(f"[warmstart] {note}", flush=True)
        return folder

    def prepare(self) -> None:
        """Start the run's log file (with the lines logged so far); record config and command
        in the run folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.log_buffer is None:
            self.log_buffer = _configure_logging()
        self.log_buffer = _stop_buffering(self.log_buffer, self.run_dir / "ppo_training.log")
        config_path = self.run_dir / "config.yaml"
        if config_path.is_file():  # an earlier invocation: keep its config if this one differs
            try:
                earlier = load_config(config_path)
            except Exception:  # unreadable or from another version: keep it all the same
                earlier = None
            if earlier != self.config:
                config_path.rename(self.run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        dump_config(self.config, config_path)
        with open(self.run_dir / "command.txt", "a") as f:
            f.write(" ".join(self.options.command) + "\n")
        log.info("run folder %s; command: %s", self.run_dir, " ".join(self.options.command))

    def find_checkpoint(self) -> tuple[CheckpointManager, Path | None]:
        manager = self._manager()
        checkpoint, problems = manager.find_resumable()
        for problem in problems:
            log.warning("checkpoint skipped: %s", problem)
        return manager, checkpoint

    def _manager(self) -> CheckpointManager:
        return CheckpointManager(self.run_dir / "checkpoints",
                                 self.config.checkpointing.max_checkpoints)

    # ================================================================ decisions
    def decide(self, checkpoint: Path | None) -> str:
        """``resume``, ``warmstart``, ``external`` or ``cold``.

        * Chunk mode with recorded progress: resume, never ask (restarting the same command
          after a crash continues with the next chunk).
        * A checkpoint and an external model: ``--resume ask`` asks on a terminal (resume the
          checkpoint / warm start again / use the external model) and refuses without one;
          ``checkpoint``, ``warmstart``, ``external`` decide without asking.
        * Only a checkpoint: resume it unless ``--resume warmstart|external`` or
          ``--force-warmstart`` (both retrain from scratch; the earlier run's outputs are moved
          to ``previous-<time>/``).
        """
        ws = self.config.warm_start
        external = ws.external_pretrain
        fresh = "cold" if not ws.enabled else ("external" if external else "warmstart")
        if checkpoint is None:
            if self.options.resume == "checkpoint":
                log.warning("--resume checkpoint: no usable checkpoint in %s; starting fresh",
                            self.run_dir / "checkpoints")
            return fresh
        if self.options.chunk_mode and (self.run_dir / PROGRESS_FILE).is_file():
            return "resume"
        choice = self.options.resume
        if self.options.force_warmstart and choice == "ask":
            choice = "warmstart"
        if choice == "ask":
            if not external:
                return "resume"
            if not self.options.interactive():
                raise PipelineError(
                    f"both a checkpoint ({checkpoint}) and an external model ({external}) exist "
                    "and --resume ask needs a terminal to ask which to use: pass --resume "
                    "checkpoint, --resume warmstart or --resume external")
            answer = self.options.prompt(
                f"A checkpoint ({checkpoint.name}) and an external model ({external}) exist.\n"
                "  [1] resume the checkpoint\n  [2] warm start again (demos + BC)\n"
                "  [3] start from the external model\nchoice [1/2/3]: ").strip()
            choice = {"1": "checkpoint", "2": "warmstart", "3": "external"}.get(answer)
            if choice is None:
                raise PipelineError(f"resume prompt: answer {answer!r} is not 1, 2 or 3")
        if choice == "checkpoint":
            return "resume"
        if choice == "external" and not external:
            raise PipelineError("--resume external: no external model (--external-pretrain)")
        if choice == "warmstart" and not ws.enabled:
            return "cold"
        return choice

    def resume(self, manager: CheckpointManager, checkpoint: Path) -> TrainingSession | None:
        """The checkpointed session, or ``None`` (after a warning) when it cannot be used."""
        try:
            session = resume_session(self.config, manager, checkpoint)
        except CheckpointError as err:
            if self.options.strict_resume:
                raise PipelineError(f"--strict-resume: {err}") from None
            log.warning("%s; continuing with a fresh training state", err)
            return None
        log.info("[Resume] continuing from %s at %d steps (to retrain from scratch instead: "
                 "--resume warmstart)", checkpoint, session.model.num_timesteps)
        return session

    def start_fresh(self, manager: CheckpointManager) -> CheckpointManager:
        """Move an earlier run's outputs aside and record this run's identity."""
        if run_folder.has_outputs(self.run_dir):
            moved = run_folder.archive_outputs(self.run_dir)
            if moved is not None:
                log.info("moved the earlier run's outputs to %s", moved)
            manager = self._manager()
        run_folder.write_identity(self.run_dir, self.config)
        return manager

    # ================================================================ stages
    def warm_start(self, decision: str) -> Pretrained | None:
        """The policy PPO starts from (``None`` for a cold start)."""
        if decision == "cold":
            return None
        options = self.options
        if decision == "external" and self.config.warm_start.skip_bc_training:
            self.stage = "loading the external model"
            return warm_start_stage.external(self.config, self.run_dir)
        self.stage = "demonstrations"
        start = time.perf_counter()
        trajectories, stats = warm_start_stage.demonstrations(
            self.config, self.run_dir, force=options.force_warmstart, progress=options.progress)
        self.timings["demos_s"] = time.perf_counter() - start
        self.stage = "behaviour cloning"
        start = time.perf_counter()
        pretrained = warm_start_stage.clone(
            self.config, self.run_dir, trajectories, stats,
            fine_tune_external=decision == "external", force=options.force_warmstart,
            progress=options.progress, command=options.command)
        self.timings["bc_s"] = time.perf_counter() - start
        if self.config.dagger.enabled:
            self.stage = "DAgger"
            start = time.perf_counter()
            pretrained = warm_start_stage.distill(
                self.config, self.run_dir, pretrained, trajectories,
                force=options.force_warmstart, progress=options.progress)
            self.timings["dagger_s"] = time.perf_counter() - start
        return pretrained

    def train_ppo(self, manager: CheckpointManager, *, resumed: bool) -> bool:
        """Train to the budget (or ``max_chunks``); True when the budget is reached."""
        self.stage = "PPO"
        config, options, session = self.config, self.options, self.session
        model = session.model
        total = config.total_requests
        trainer = PPOTrainer(config, session, self.run_dir, manager, resumed=resumed,
                             progress=options.progress)
        progress = self.read_progress()
        start = time.perf_counter()
        try:
            if options.chunk_mode:
                size = options.chunk_size or total
                done = [c["index"] for c in progress["chunks"]]
                if done:
                    log.info("chunks already completed: %s", done)
                ran = 0
                while model.num_timesteps < total:
                    if options.max_chunks is not None and ran >= options.max_chunks:
                        log.info("stopping after %d chunk(s) (--max-chunks); run the same "
                                 "command again to continue", ran)
                        return False
                    index = model.num_timesteps // size
                    chunk_end = min((index + 1) * size, total)
                    t0 = time.perf_counter()
                    log.info("chunk %d: steps %d -> %d of %d", index, model.num_timesteps,
                             chunk_end, total)
                    trainer.learn(chunk_end - model.num_timesteps)
                    path = trainer.save_checkpoint()
                    progress["chunks"].append({
                        "index": index, "end_timesteps": int(model.num_timesteps),
                        "checkpoint": path.name, "wall_s": round(time.perf_counter() - t0, 2),
                        "completed": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    progress["chunk_size"] = size
                    self.write_progress(progress)
                    ran += 1
            elif model.num_timesteps < total:
                trainer.learn(total - model.num_timesteps)
                trainer.save_checkpoint()
        finally:
            self.timings["ppo_s"] = time.perf_counter() - start
        progress["status"] = "finished"
        progress["num_timesteps"] = int(model.num_timesteps)
        self.write_progress(progress)
        trainer.finish()
        log.info("PPO finished at %d steps (%.1f s this invocation)", model.num_timesteps,
                 self.timings["ppo_s"])
        return True

    def report(self) -> dict[str, Any]:
        """The trained router against every heuristic, written to ``<run>/report``."""
        from sb3_warmstart.pipeline.report import build_report

        self.stage = "the report"
        t0 = time.perf_counter()
        summary = build_report(self.run_dir, self.config, self.session,
                               self.session.callbacks["monitor"], pretrained=self.pretrained,
                               timings=self.timings, progress=self.options.progress)
        self.timings["report_s"] = time.perf_counter() - t0
        return summary

    # ================================================================ progress file
    def progress_path(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    def read_progress(self) -> dict[str, Any]:
        path = self.progress_path()
        identity = settings_hash(self.config.training_identity())
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                log.warning("%s is unreadable; starting a new one", path)
            else:
                progress["identity"] = identity
                return progress
        return {"format": 2, "identity": identity, "chunks": [],
                "total_requests": self.config.total_requests, "status": "running"}

    def write_progress(self, progress: dict[str, Any]) -> None:
        atomic_write_json(self.progress_path(), progress)


def _configure_logging() -> logging.handlers.MemoryHandler:
    """The pipeline log: every line on the console at once (stdout, with the progress lines and
    the results, so ``| tee`` keeps them in order), and kept in a buffer until
    :func:`_stop_buffering` says whether the run folder's log file gets them."""
    root = logging.getLogger("sb3_warmstart")
    root.setLevel(logging.INFO)
    root.propagate = False  # libraries configure the root logger; print each line once
    for old in [h for h in root.handlers if getattr(h, "_warmstart_run", False)]:
        root.removeHandler(old)
        old.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[warmstart] %(message)s"))
    buffer = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1,
                                            flushOnClose=False)
    for handler in (console, buffer):
        handler._warmstart_run = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    try:  # HuggingFace datasets (imitation's demo format) prints a bar per save
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
    return buffer


def _stop_buffering(buffer: logging.handlers.MemoryHandler, path: Path | None) -> None:
    """End the buffer of :func:`_configure_logging`: with ``path``, its lines and every later
    line go to that file (appended); with ``None`` they are dropped (a finished run being
    re-evaluated leaves its log untouched). Returns ``None`` (the buffer is closed)."""
    root = logging.getLogger("sb3_warmstart")
    root.removeHandler(buffer)
    if path is not None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._warmstart_run = True  # type: ignore[attr-defined]
        buffer.setTarget(handler)
        buffer.flush()
        root.addHandler(handler)
    buffer.setTarget(None)
    buffer.buffer.clear()
    buffer.close()
    return None
