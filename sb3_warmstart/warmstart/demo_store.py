"""Storing demonstration sets: save, load, read their stats, check them against an env.

On-disk format (:func:`save_demonstrations`)
--------------------------------------------
One directory ``<path>/``: the HuggingFace ``datasets`` directory written by
:func:`imitation.data.serialize.save` (so ``imitation.data.serialize.load(path)`` and
``load_with_rewards(path)`` read it directly) plus ``<path>/stats.json`` (see
:func:`sb3_warmstart.warmstart.demo_collect.collect_demonstrations` and
:func:`sb3_warmstart.warmstart.family_demos.collect_best_heuristic_demonstrations` for its
keys). The directory is written under a temporary sibling name and swapped into place
atomically (``renameat2(RENAME_EXCHANGE)`` on Linux), so a crash leaves either the previous
complete set or the new complete one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import fsync_dir, make_temporary_dir
from llm_cluster_env.env.observation import ObservationLayout

FORMAT = "sb3_warmstart/demos/v1"
STATS_FILE = "stats.json"


class DemonstrationMismatchError(ValueError):
    """Stored demonstrations were recorded with a different observation layout."""


def _layout_of(env: Any) -> ObservationLayout:
    if isinstance(env, ObservationLayout):
        return env
    unwrapped = getattr(env, "unwrapped", None)
    if unwrapped is not None and hasattr(unwrapped, "layout"):
        return unwrapped.layout
    if hasattr(env, "get_attr"):  # an SB3 VecEnv
        return env.get_attr("layout", indices=[0])[0]
    raise TypeError(f"env={env!r}: expected an LLMCluster env, a VecEnv of them or a layout")


def schema_differences(stored: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two ``layout.schema()`` dicts (empty if equal)."""
    stored = json.loads(json.dumps(dict(stored)))
    actual = json.loads(json.dumps(dict(actual)))
    out = []
    for key in sorted(set(stored) | set(actual)):
        if key not in actual:
            out.append(f"{key}: in the demonstrations ({stored[key]!r}) but not in the env")
            continue
        if key not in stored:
            out.append(f"{key}: in the env ({actual[key]!r}) but not in the demonstrations")
            continue
        a, b = stored[key], actual[key]
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            parts = []
            if len(a) != len(b):
                parts.append(f"length {len(a)} in the demonstrations vs {len(b)} in the env")
            if first is not None:
                parts.append(f"first difference at [{first}]: {a[first]!r} vs {b[first]!r}")
            elif len(a) != len(b):
                longer, which = (a, "demonstrations") if len(a) > len(b) else (b, "env")
                parts.append(f"extra in the {which}: {longer[min(len(a), len(b))]!r}...")
            out.append(f"{key}: " + "; ".join(parts))
        else:
            out.append(f"{key}: {a!r} in the demonstrations vs {b!r} in the env")
    return out


def check_demonstrations_match_env(stats: Mapping[str, Any], env: Any) -> None:
    """Raise :class:`DemonstrationMismatchError` naming each schema field that differs between
    the demonstrations' ``stats["schema"]`` and ``env``'s ``layout.schema()``.

    :param stats: the stats of :func:`collect_demonstrations` / :func:`load_demonstrations`.
    :param env: an ``LLMCluster-v0`` env (wrapped or not), a VecEnv of them, or a layout.
    """
    if "schema" not in stats:
        raise DemonstrationMismatchError("stats has no 'schema': cannot check the demonstrations "
                                         "against the env")
    diffs = schema_differences(stats["schema"], _layout_of(env).schema())
    if diffs:
        raise DemonstrationMismatchError(
            "demonstrations do not match the env's observation layout: " + " | ".join(diffs))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    platform or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_output_replaceable(path: str | os.PathLike) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and is not an earlier demonstration set
    (an empty directory is fine): :func:`save_demonstrations` never replaces anything else."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"path={str(path)!r}: exists and is not a demonstration directory; "
                              "refusing to replace it")
    if not (path / STATS_FILE).is_file() and any(path.iterdir()):
        raise FileExistsError(f"path={str(path)!r}: an existing directory without {STATS_FILE} "
                              "(not a demonstration set); refusing to replace it")


def save_demonstrations(path: str | os.PathLike, trajectories: Sequence, stats: Mapping[str, Any]
                        ) -> Path:
    """Write ``trajectories`` and ``stats`` to the directory ``path``, atomically.

    The HuggingFace dataset of :func:`imitation.data.serialize.save` and ``stats.json`` are
    written into a temporary sibling directory, then swapped with ``path``; a previous set at
    ``path`` is deleted only after the swap. On any error the temporary directory is removed
    and ``path`` is untouched. ``path`` may only replace an earlier demonstration set.

    :param path: output directory.
    :param trajectories: imitation ``TrajectoryWithRew`` sequence.
    :param stats: JSON-able statistics (as from :func:`collect_demonstrations`).
    :return: ``path`` as a ``Path``.
    """
    from imitation.data import serialize

    path = Path(path)
    check_output_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(stats), indent=1)  # fails here (not half-way) if not JSON-able
    tmp = make_temporary_dir(path.parent, f".{path.name}.tmp-")
    old: Path | None = None
    try:
        serialize.save(tmp, trajectories)
        with open(tmp / STATS_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)  # atomic; fails if someone created path meanwhile
        elif _rename_exchange(tmp, path):
            old = tmp  # the previous set now lives at the temporary name
        else:  # no atomic exchange: keep the old set complete under a backup name until done
            old = make_temporary_dir(path.parent, f".{path.name}.old-")
            os.rename(path, old / "set")
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old / "set", path)
                raise
        fsync_dir(path.parent)
    except BaseException:
        if old != tmp:  # after an exchange, tmp holds the previous set: leave both intact
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old != tmp and not (old / "set").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_stats(path: str | os.PathLike) -> dict[str, Any] | None:
    """``<path>/stats.json`` as a dict (``None`` when the set has none, e.g. a bare
    ``imitation.data.serialize.save`` directory).

    :raises ValueError: the file is not a JSON object.
    """
    stats_path = Path(path) / STATS_FILE
    if not stats_path.is_file():
        return None
    try:
        stats = json.loads(stats_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{stats_path}: corrupt JSON ({err})") from err
    if not isinstance(stats, dict):
        raise ValueError(f"{stats_path}: expected a JSON object, got {type(stats).__name__}")
    return stats


def action_count(schema: Mapping[str, Any]) -> int:
    """The number of actions of the env a schema describes: its replica slots.

    A scenario family's layout (:func:`llm_cluster_env.env.family.family_layout`) has
    ``replica_slots`` slots and a placeholder ``num_replicas`` of 1, and its demonstrations
    route to any slot of the sampled cluster; a single scenario's slots are its replicas unless
    the observation pads them. Schemas written before ``replica_slots`` existed have only
    ``num_replicas``.
    """
    return int(schema.get("replica_slots") or schema["num_replicas"])


def load_demonstrations(path: str | os.PathLike) -> tuple[list, dict[str, Any]]:
    """Load and validate a set written by :func:`save_demonstrations`.

    :param path: the demonstration directory.
    :return: ``(trajectories, stats)``: a list of ``TrajectoryWithRew`` (float32 observations,
        as the env returns them) and the stats dict.
    :raises FileNotFoundError: ``path`` or its ``stats.json`` is missing.
    :raises ValueError: ``stats.json`` or the dataset is corrupt or inconsistent.
    """
    from imitation.data import serialize

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"demonstrations path={str(path)!r}: does not exist")
    if not path.is_dir():
        raise ValueError(f"demonstrations path={str(path)!r}: not a directory (a demonstration "
                         "set is the directory written by save_demonstrations)")
    stats_path = path / STATS_FILE
    stats = read_stats(path)
    if stats is None:
        raise FileNotFoundError(f"demonstrations path={str(path)!r}: missing {STATS_FILE} (not "
                                "written by save_demonstrations, or an incomplete copy)")
    if stats.get("format") != FORMAT:
        raise ValueError(f"{stats_path}: format={stats.get('format')!r}, expected {FORMAT!r}")
    for key in ("schema", "trajectory_policies", "total_steps", "total_episodes"):
        if key not in stats:
            raise ValueError(f"{stats_path}: missing key {key!r}")
    try:
        trajectories = list(serialize.load_with_rewards(path))
    except Exception as err:
        raise ValueError(f"demonstrations path={str(path)!r}: corrupt trajectory dataset "
                         f"({type(err).__name__}: {err})") from err
    if len(trajectories) != stats["total_episodes"]:
        raise ValueError(f"{path}: {len(trajectories)} trajectories but stats "
                         f"total_episodes={stats['total_episodes']}")
    if len(stats["trajectory_policies"]) != len(trajectories):
        raise ValueError(f"{stats_path}: trajectory_policies has "
                         f"{len(stats['trajectory_policies'])} entries for {len(trajectories)} "
                         "trajectories")
    steps = sum(len(t.acts) for t in trajectories)
    if steps != stats["total_steps"]:
        raise ValueError(f"{path}: {steps} transitions but stats "
                         f"total_steps={stats['total_steps']}")
    width = len(stats["schema"]["feature_names"])
    num_actions = action_count(stats["schema"])
    for i, traj in enumerate(trajectories):
        if traj.obs.ndim != 2 or traj.obs.shape[1] != width:
            raise ValueError(f"{path}: trajectory {i} obs.shape={traj.obs.shape}, expected "
                             f"(T+1, {width}) from the stored schema")
        if traj.acts.size and not (0 <= traj.acts.min() and traj.acts.max() < num_actions):
            raise ValueError(f"{path}: trajectory {i} has actions outside [0, {num_actions}) "
                             f"(the {num_actions} replica slots of the stored schema)")
        # The dataset stores float32; imitation's loader hands back float64 copies. Restore the
        # env's dtype (exact) so loaded observations equal collected ones bit for bit.
        trajectories[i] = dataclasses.replace(traj, obs=traj.obs.astype(np.float32))
    return trajectories, stats


__all__ = ["FORMAT", "STATS_FILE", "DemonstrationMismatchError", "action_count",
           "check_demonstrations_match_env", "check_output_replaceable", "load_demonstrations",
           "read_stats", "save_demonstrations", "schema_differences"]
