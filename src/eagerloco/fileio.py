"""Durable file writes shared by checkpoints, run outputs and caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS allows (Linux:
    /proc/self/status); elsewhere set and restored at once under a lock (only this module's threads are
    serialised, so keep the fallback rare)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a uniquely named temporary file in the same directory,
    flushed and fsynced, renamed over ``path`` (atomic on POSIX), then the directory fsynced so the rename
    survives a crash. Readers see the old file or the complete new one, never a part.

    The file gets the mode a plain ``open(path, "wb")`` would give it, ``0o666 & ~umask`` (usually 0644), not
    the 0600 that :func:`tempfile.mkstemp` creates its files with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
