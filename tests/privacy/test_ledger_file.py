"""The ledger file: a write killed part-way leaves the old ledger or the new one, never a broken
one; a damaged file stops the node instead of resetting its budget."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedpeft.privacy import LedgerCorrupt, LedgerFile


def _fields(steps: int) -> dict:
    return {"history": [[1.0, 0.01, steps]], "padding": "x" * 200_000}  # large: slow to write


def test_a_write_that_fails_part_way_leaves_the_old_ledger(tmp_path, monkeypatch):
    store = LedgerFile(tmp_path, 3, 1)
    store.save(_fields(5))

    def dump_half(record, f, **kwargs):
        f.write('{"format": "fedpeft-privacy-ledger/1", "ledger": {"hist')
        raise OSError("disk full")

    monkeypatch.setattr("fedpeft.privacy.ledger_file.json.dump", dump_half)
    with pytest.raises(OSError, match="disk full"):
        store.save(_fields(6))
    monkeypatch.undo()
    assert store.load()["history"] == [[1.0, 0.01, 5]]
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp left


def test_a_process_killed_while_writing_leaves_a_whole_ledger(tmp_path):
    """SIGKILL a process that rewrites its ledger in a loop, at several moments: every time the
    file on disk is one whole version."""
    script = textwrap.dedent(
        f"""
        from fedpeft.privacy import LedgerFile
        store = LedgerFile({str(tmp_path)!r}, 3, 1)
        steps = 0
        while True:
            steps += 1
            store.save({{"history": [[1.0, 0.01, steps]], "padding": "x" * 200_000}})
        """
    )
    seen = []
    for delay in (0.8, 1.1, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            deadline = time.monotonic() + 60
            while not LedgerFile(tmp_path, 3, 1).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ledger = LedgerFile(tmp_path, 3, 1).load()  # never raises LedgerCorrupt
        seen.append(ledger["history"][0][2])
        assert len(ledger["padding"]) == 200_000
    assert all(s >= 1 for s in seen)


@pytest.mark.parametrize("content", ["", '{"format": "fedpeft-privacy-ledger/1", "run": 3', "[]"])
def test_a_damaged_or_foreign_ledger_stops_the_node(tmp_path, content):
    store = LedgerFile(tmp_path, 3, 1)
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.raises(LedgerCorrupt, match="refuses to train rather than forget"):
        store.load()


def test_a_ledger_of_another_run_or_client_is_not_taken(tmp_path):
    LedgerFile(tmp_path, 3, 1).save(_fields(5))
    moved = LedgerFile(tmp_path, 3, 2)
    moved.path.write_bytes(LedgerFile(tmp_path, 3, 1).path.read_bytes())
    with pytest.raises(LedgerCorrupt, match="not a valid ledger of data 2"):
        moved.load()
    assert LedgerFile(tmp_path, 4, 1).load() is None
