"""Full-state checkpoints with exact resume.

A checkpoint is a directory ``step_<num_timesteps>/`` holding:

``model.zip``
    SB3's own save: policy weights and **optimiser state** (and our algorithm's training state).
``state.pkl``
    everything else a resumed run needs to continue *exactly*: the algorithm's counters and
    schedule positions (``num_timesteps``, updates, KL-decay/entropy-warm-up/LR-scheduler
    positions via ``get_training_state``: reference policy, its LSTM carry state, adaptive batch
    size), the rollout carry-over (last observation, episode starts, LSTM states), the
    ``VecNormalize`` statistics *and* its running discounted returns, the environments
    themselves (so the workload and the simulator stand exactly where they stood), the state of
    the temperature controller and the training monitor, and the RNG states (Python, NumPy,
    torch).
``vecnormalize.json``
    the ``VecNormalize`` settings and statistics as JSON
    (:func:`~sb3_warmstart.common.normalize.vec_normalize_to_json`), readable without this project;
    ``model.zip`` loads with stock SB3's ``load`` given this package without extras
    (see ``docs/export.md``).
``manifest.json``
    format version, step count, a fingerprint of what the checkpoint fits (observation schema,
    action count, algorithm, architecture, number of envs, env kwargs) and the SHA-256 and size
    of every file. Written last.

Writing is atomic: the directory is built under a temporary name, fsynced, renamed into place,
and only then does ``latest.json`` (itself replaced atomically) point at it; older checkpoints
beyond ``max_checkpoints`` are removed afterwards. Killing the process at any moment leaves the
previous checkpoint and ``latest.json`` valid.

Loading verifies every checksum before reading anything: a corrupt checkpoint is reported and
never loaded. A checkpoint whose fingerprint differs from the current run (another env, another
architecture) raises :class:`CheckpointMismatch`; the pipeline turns that into a warning and a
fresh start, or an error with ``--strict-resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecNormalize

from llm_cluster_env.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from sb3_warmstart.common.normalize import vec_normalize_to_json

FORMAT_VERSION = 1
MODEL_FILE = "model.zip"
STATE_FILE = "state.pkl"
#: The normaliser statistics as JSON (for loading without this project).
NORMALIZER_FILE = "vecnormalize.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)

#: SB3 attributes that carry a run from one rollout to the next.
_CARRY_ATTRIBUTES = (
    "num_timesteps", "_n_updates", "_episode_num", "_last_obs", "_last_original_obs",
    "_last_episode_starts", "_current_progress_remaining", "ep_info_buffer",
    "ep_success_buffer", "_last_lstm_states",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class CorruptCheckpoint(CheckpointError):
    """Missing files, bad checksums or unreadable content: reported, never loaded."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is intact but belongs to another configuration."""

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.path = path
        self.differences = differences
        super().__init__(f"checkpoint {path} does not fit this run: " + "; ".join(differences))


@dataclass
class TrainingSession:
    """What a checkpoint captures.

    :param model: the (KL-regularised) on-policy algorithm.
    :param venv: its ``VecNormalize`` over a ``DummyVecEnv``.
    :param stateful: named objects with ``state_dict()``/``load_state_dict()`` (callbacks).
    :param fingerprint: JSON-able description of what this run is (compared on resume).
    :param extra: JSON-able facts stored in the manifest (chunk index, stage...).
    :param callbacks: the run's callbacks by name (those in ``stateful`` and stateless ones).
    :param pending_log_values: set by :func:`restore_state`: logger values the checkpoint held
        (apply them with :func:`restore_pending_log_values` once the logger is set).
    """

    model: OnPolicyAlgorithm
    venv: VecNormalize
    stateful: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    pending_log_values: dict[str, Any] | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch RNG states: SB3 draws from all three."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": th.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    th.set_rng_state(state["torch"])


def capture_state(session: TrainingSession) -> dict[str, Any]:
    """Everything outside ``model.zip`` that the run needs to continue exactly."""
    model, venv = session.model, session.venv
    inner = venv.venv
    if not hasattr(inner, "envs"):
        raise CheckpointError("checkpoints need a DummyVecEnv inside VecNormalize (the "
                              "environments are saved with the run)")
    state: dict[str, Any] = {
        "carry": {name: getattr(model, name, None) for name in _CARRY_ATTRIBUTES},
        "training_state": (model.get_training_state()
                           if hasattr(model, "get_training_state") else None),
        "policy_flags": {"temperature": getattr(model.policy, "temperature", 1.0),
                         "uniform_actions": getattr(model.policy, "uniform_actions", False)},
        "vecnormalize": {"obs_rms": venv.obs_rms, "ret_rms": venv.ret_rms,
                         "returns": np.array(venv.returns, copy=True), "training": venv.training,
                         "norm_obs": venv.norm_obs, "norm_reward": venv.norm_reward},
        "envs": inner.envs,
        "stateful": {name: obj.state_dict() for name, obj in session.stateful.items()},
        "rng": rng_state(),
        "logger": _pending_log_values(model),
    }
    if state["training_state"] is not None:
        state["training_state"] = dict(state["training_state"], updates_deferred=False)
    return state


def _pending_log_values(model: OnPolicyAlgorithm) -> dict[str, Any] | None:
    """Values recorded but not yet dumped (the ``train/`` metrics of the update before the
    checkpoint, dumped with the next rollout's row): a resumed run writes that row in full."""
    logger = getattr(model, "_logger", None)
    if logger is None:
        return None
    return {"values": dict(logger.name_to_value), "counts": dict(logger.name_to_count),
            "excluded": dict(logger.name_to_excluded)}


def restore_state(session: TrainingSession, state: Mapping[str, Any]) -> None:
    """Apply :func:`capture_state` output to a freshly built session (after its model.zip)."""
    model, venv = session.model, session.venv
    for name, value in state["carry"].items():
        if value is not None or hasattr(model, name):
            setattr(model, name, value)
    if state["training_state"] is not None:
        model.set_training_state(state["training_state"])
    for name, value in state["policy_flags"].items():
        if hasattr(model.policy, name):
            setattr(model.policy, name, value)
    norm = state["vecnormalize"]
    venv.obs_rms, venv.ret_rms = norm["obs_rms"], norm["ret_rms"]
    venv.returns = np.array(norm["returns"], copy=True)
    venv.training, venv.norm_obs, venv.norm_reward = (norm["training"], norm["norm_obs"],
                                                      norm["norm_reward"])
    envs = state["envs"]
    if len(envs) != venv.num_envs:
        raise CheckpointError(f"the checkpoint holds {len(envs)} environments, this run has "
                              f"{venv.num_envs} (n_envs)")
    venv.venv.envs = list(envs)
    for name, obj in session.stateful.items():
        if name in state["stateful"]:
            obj.load_state_dict(state["stateful"][name])
    session.pending_log_values = state.get("logger")
    set_rng_state(state["rng"])


def restore_pending_log_values(logger: Any, pending: Mapping[str, Any] | None) -> None:
    """Put the values a checkpoint found recorded-but-not-dumped back into ``logger`` (an SB3
    ``Logger``, set on the model after loading), so the next row is the uninterrupted run's."""
    if pending is None:
        return
    logger.name_to_value.clear()
    logger.name_to_value.update(pending["values"])
    logger.name_to_count.clear()
    logger.name_to_count.update(pending["counts"])
    logger.name_to_excluded.clear()
    logger.name_to_excluded.update(pending["excluded"])


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                            prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, one per differing leaf, named by
    dotted path (empty = compatible)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True,
                                                                       default=str):
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


class CheckpointManager:
    """Writes, rotates, verifies and loads checkpoints under ``directory``.

    :param directory: the run's ``checkpoints/`` folder.
    :param max_checkpoints: newest checkpoints kept (the one ``latest.json`` names is never
        removed).
    """

    def __init__(self, directory: str | os.PathLike, max_checkpoints: int) -> None:
        self.directory = Path(directory)
        self.max_checkpoints = max_checkpoints
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary directories of a write that was interrupted (never valid checkpoints)."""
        for path in self.directory.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- listing
    def checkpoints(self) -> list[Path]:
        """Completed checkpoint directories, oldest first."""
        found = [p for p in self.directory.glob(f"{PREFIX}*") if p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        """The checkpoint ``latest.json`` points at (``None`` if there is none)."""
        pointer = self.directory / LATEST_FILE
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; ignoring it", pointer)
            return None
        path = self.directory / name
        return path if path.is_dir() else None

    # -------------------------------------------------------------- writing
    def save(self, session: TrainingSession) -> Path:
        """Write a checkpoint of ``session`` atomically; returns its directory."""
        steps = int(session.model.num_timesteps)
        final = self.directory / f"{PREFIX}{steps:012d}"
        tmp = self.directory / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            session.model.save(tmp / MODEL_FILE)
            atomic_write_bytes(tmp / STATE_FILE, pickle.dumps(capture_state(session),
                                                              protocol=pickle.HIGHEST_PROTOCOL))
            atomic_write_json(tmp / NORMALIZER_FILE, vec_normalize_to_json(session.venv))
            files = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                     for name in (MODEL_FILE, STATE_FILE, NORMALIZER_FILE)}
            atomic_write_json(tmp / MANIFEST_FILE, {
                "format": FORMAT_VERSION, "num_timesteps": steps,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "fingerprint": session.fingerprint, "extra": session.extra, "files": files,
            })
            fsync_dir(tmp)
            if final.exists():  # same step saved again (e.g. a chunk end on an interval)
                stale = self.directory / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
                os.rename(final, stale)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(self.directory / LATEST_FILE,
                          {"checkpoint": final.name, "num_timesteps": steps})
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        existing = self.checkpoints()
        for path in existing[: max(0, len(existing) - self.max_checkpoints)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- reading
    def verify(self, path: str | os.PathLike) -> dict[str, Any]:
        """The manifest of an intact checkpoint; :class:`CorruptCheckpoint` otherwise."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CorruptCheckpoint(f"{path}: no {MANIFEST_FILE} (incomplete checkpoint)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            version = manifest["format"]
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST_FILE}: {err}") from None
        if version != FORMAT_VERSION:
            raise CorruptCheckpoint(f"{path}: format {version!r}, expected {FORMAT_VERSION}")
        for name, meta in files.items():
            file = path / name
            if not file.is_file():
                raise CorruptCheckpoint(f"{path}: {name} is missing")
            if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
                raise CorruptCheckpoint(f"{path}: {name} does not match its checksum "
                                        "(truncated or modified); not loaded")
        return manifest

    def find_resumable(self) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from and the problems met on the way.

        ``latest.json``'s target if intact, else the newest intact checkpoint. Corrupt ones are
        listed in the problems and skipped.
        """
        problems: list[str] = []
        candidates = []
        latest = self.latest()
        if latest is not None:
            candidates.append(latest)
        candidates += [p for p in reversed(self.checkpoints()) if p != latest]
        for path in candidates:
            try:
                self.verify(path)
            except CorruptCheckpoint as err:
                problems.append(str(err))
                continue
            return path, problems
        return None, problems

    def load(self, path: str | os.PathLike, session: TrainingSession) -> dict[str, Any]:
        """Restore ``session`` from the checkpoint at ``path``; returns its manifest.

        :raises CorruptCheckpoint: bad checksums or unreadable content.
        :raises CheckpointMismatch: another configuration (nothing is modified then).
        """
        path = Path(path)
        manifest = self.verify(path)
        differences = fingerprint_differences(manifest.get("fingerprint", {}), session.fingerprint)
        if differences:
            raise CheckpointMismatch(path, differences)
        try:
            state = pickle.loads((path / STATE_FILE).read_bytes())
        except Exception as err:  # unpickling runs arbitrary class code
            raise CorruptCheckpoint(f"{path}: {STATE_FILE} cannot be read: {err}") from None
        try:
            session.model.set_parameters(str(path / MODEL_FILE), exact_match=True,
                                         device=session.model.device)
        except Exception as err:
            raise CheckpointMismatch(path, [f"model parameters: {err}"]) from None
        restore_state(session, state)
        return manifest


class PeriodicCheckpoint(BaseCallback):
    """Saves a checkpoint every ``interval`` env steps, at rollout boundaries, and on request
    (:meth:`request_stop`: Ctrl-C) saves one at the next boundary and stops training.

    It acts at the start of a rollout, i.e. right after the previous update, before any other
    callback has changed anything for the new rollout -- put it FIRST in the callback list. The
    state it captures is then exactly the state a resumed ``learn()`` starts from.

    :param manager: where checkpoints go.
    :param session: the session to capture.
    :param interval: env steps between checkpoints.
    :param after_save: called with the checkpoint's directory after each save (e.g. to rewrite
        logs that are derived from the checkpointed state).
    """

    def __init__(self, manager: CheckpointManager, session: TrainingSession, interval: int,
                 after_save: Callable[[Path], None] | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.manager = manager
        self.session = session
        self.interval = interval
        self.after_save = after_save
        self.saved: list[Path] = []
        self.stop_requested = False
        self.stopped_at: Path | None = None

    def request_stop(self) -> None:
        """Save at the next rollout boundary and end ``learn()`` (safe from a signal handler)."""
        self.stop_requested = True

    def _next_due(self) -> int:
        last = self.session.extra.get("last_checkpoint_step", 0)
        return (last // self.interval + 1) * self.interval

    def _on_rollout_start(self) -> None:
        if self.stop_requested and self.stopped_at is None:
            self.stopped_at = self.save()
        elif self.model.num_timesteps >= self._next_due():
            self.save()

    def save(self) -> Path:
        self.session.extra["last_checkpoint_step"] = int(self.model.num_timesteps)
        path = self.manager.save(self.session)
        self.saved.append(path)
        if self.after_save is not None:
            self.after_save(path)
        if self.verbose:
            log.info("checkpoint %s", path)
        return path

    def _on_step(self) -> bool:
        return self.stopped_at is None
