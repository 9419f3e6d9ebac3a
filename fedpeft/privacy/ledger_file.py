"""The file a node keeps its privacy ledger in, one per (run, node), written atomically.

A SuperNode keeps its Flower `Context.state` in memory only, so a ledger there would be forgotten
at a restart and the node would spend its budget again. The file lives in the node's own state
directory (node config `state-dir`), under `run-<run id>/client-<name>.json`; each write goes to a
temporary file in the same directory, is flushed to disk, and replaces the old file in one
`os.replace`, so a write killed part-way leaves the old ledger or the new one, never a broken one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fedpeft.errors import FedPeftError

FORMAT = "fedpeft-privacy-ledger/1"


class LedgerCorrupt(FedPeftError):
    """A ledger file exists but cannot be read: the node refuses to train rather than reset."""


class LedgerFile:
    """One node's ledger for one run, on disk."""

    def __init__(self, state_dir: str | os.PathLike, run_id: int, member: int) -> None:
        self.run_id, self.member = int(run_id), int(member)
        self.path = Path(state_dir) / f"run-{self.run_id}" / f"client-{self.member}.json"

    def exists(self) -> bool:
        """Whether this node has spent budget in this run (its ledger file is there)."""
        return self.path.exists()

    def load(self) -> dict[str, Any] | None:
        """The saved ledger fields, or None when the node has not trained privately in this run."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerCorrupt(f"cannot read the privacy ledger {self.path}: {exc}") from exc
        try:
            record = json.loads(text)
            ok = (
                record.get("format") == FORMAT
                and record.get("run") == self.run_id
                and record.get("client") == self.member
            )
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise LedgerCorrupt(
                f"the privacy ledger {self.path} is not a valid ledger of run {self.run_id}, "
                f"client {self.member}: this node refuses to train rather than forget what it "
                "spent; restore the file from a backup (deleting it resets the budget)"
            )
        return record["ledger"]

    def save(self, fields: dict[str, Any]) -> None:
        """Replace the ledger on disk atomically (temporary file, fsync, os.replace, fsync dir)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "run": self.run_id, "client": self.member, "ledger": fields}
        write_atomically(self.path, lambda f: json.dump(record, f), mode="w")


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
