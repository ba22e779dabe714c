"""Crash-safe file writes: write a temporary sibling, fsync it, rename it into place.

A reader (or a process restarted after ``kill -9``) sees either the old complete file or the new
complete file, never a mix: ``os.replace`` is atomic on POSIX file systems, and the directory is
fsynced so the rename itself survives a power cut.

Files and directories are created with the permissions of an ordinary ``open()``/``mkdir()``
(0666/0777 less the process umask), not the owner-only 0600/0700 of ``tempfile``: what a run
writes is readable by whoever may read its folder.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

_FILE_MODE = 0o666  # less the umask, as open() creates files
_DIR_MODE = 0o777  # less the umask, as mkdir() creates directories


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (after a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(parent: Path, prefix: str, suffix: str = "") -> Path:
    return parent / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def make_temporary_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` (mode 0777 less the umask, unlike
    ``tempfile.mkdtemp``'s 0700), for building a directory that is renamed into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _temporary_name(parent, prefix)
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            continue
        return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; returns the path. The file gets mode 0666 less
    the umask (like ``open(path, "wb")``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temporary_name(path.parent, f".{path.name}.", ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
