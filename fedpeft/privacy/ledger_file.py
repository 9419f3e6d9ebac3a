"""The file a node keeps its privacy ledger in: one per data set, every run in it, locked, atomic.

A SuperNode keeps its Flower `Context.state` in memory only, so a ledger there would be forgotten
at a restart and the node would spend its budget again. The ledger is a file in the node's own
state directory (node config `state-dir`), `ledgers/<data>.json`, where `<data>` is a fingerprint
of the data the node trains on (client_data.data_fingerprint), not the Flower run id: every run
over the same data is recorded in the same file, so a new run, a new run id or a restart composes
with what was spent before and never refills the budget (privacy.ledger: the lifetime cap).

Each write goes to a temporary file in the same directory, is flushed to disk, and replaces the
old file in one `os.replace`, so a write killed part-way leaves the old ledger or the new one,
never a broken one. `lock()` takes an exclusive lock (flock on a sibling `.lock` file) that a
private round holds from its budget check to its last write, so two messages handled at once,
in two processes, spend one after the other and never more than the budget between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from fedpeft.durable_files import exclusive_lock, write_atomically
from fedpeft.errors import FedPeftError

FORMAT = "fedpeft-privacy-ledger/2"
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class LedgerCorrupt(FedPeftError):
    """A ledger file exists but cannot be read: the node refuses to train rather than reset."""


class LedgerFile:
    """The ledger of one data set, on disk; `load`/`save` read and write one run's entry."""

    def __init__(self, state_dir: str | os.PathLike, run_id: int, data: str | int) -> None:
        self.run_id, self.data = int(run_id), str(data)
        if not _KEY.match(self.data):
            raise ValueError(f"a ledger's data key must match {_KEY.pattern}, got {self.data!r}")
        self.path = Path(state_dir) / "ledgers" / f"{self.data}.json"

    def _record(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerCorrupt(f"cannot read the privacy ledger {self.path}: {exc}") from exc
        try:
            record = json.loads(text, parse_constant=_refuse_constant)
            ok = (
                isinstance(record, dict)
                and record.get("format") == FORMAT
                and record.get("data") == self.data
                and isinstance(record.get("runs"), dict)
                and all(isinstance(run, dict) for run in record["runs"].values())
            )
        except (json.JSONDecodeError, ValueError):
            ok = False
        if not ok:
            raise LedgerCorrupt(
                f"the privacy ledger {self.path} is not a valid ledger of data {self.data}: this "
                "node refuses to train rather than forget what it spent; restore the file from a "
                "backup (deleting it resets the budget)"
            )
        return record

    def runs(self) -> dict[int, dict[str, Any]]:
        """Every run's saved ledger fields on this data, by run id (empty before any spending)."""
        record = self._record()
        return {} if record is None else {int(k): v for k, v in record["runs"].items()}

    def exists(self) -> bool:
        """Whether this node has spent budget on this data in this run."""
        return self.run_id in self.runs()

    def load(self) -> dict[str, Any] | None:
        """This run's saved ledger fields, or None when the node has not trained privately in it."""
        return self.runs().get(self.run_id)

    def save(self, fields: dict[str, Any]) -> None:
        """Replace this run's entry, keeping every other run's (hold `lock()` around read+write)."""
        runs = {str(k): v for k, v in self.runs().items()}
        runs[str(self.run_id)] = fields
        record = {"format": FORMAT, "data": self.data, "runs": runs}
        write_atomically(self.path, lambda f: json.dump(record, f, allow_nan=False), mode="w")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold this data set's ledger exclusively (across processes) for the block."""
        return exclusive_lock(self.path.with_suffix(".lock"))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite constant {name}")
