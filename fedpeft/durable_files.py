"""Files that several processes share: written whole or not at all, and locked while in use.

A write goes to a temporary file in the same directory, is flushed to disk and replaces the old
file in one `os.replace`, so a write killed part-way leaves the old file or the new one, never a
broken one. `exclusive_lock` takes an flock on a sibling lock file, so that processes on one host
(Ray's actors, two SuperNodes) take turns. Privacy ledgers, local factors and pooled clients'
state (clients/client_store.py) are kept this way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold `lock_path` exclusively (flock, across processes) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomically(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Replace `path` with what `write` writes (temporary file, fsync, os.replace, fsync dir).

    A write killed part-way leaves the old file or the new one, never a broken one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds the file (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
