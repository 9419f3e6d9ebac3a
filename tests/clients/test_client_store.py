"""Pooled clients' state files: kept per client id, whole or not at all, one process at a time."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedpeft.clients.client_store import ClientStateCorrupt, ClientStore


def test_a_clients_state_comes_back_as_it_was_left(tmp_path):
    store = ClientStore(tmp_path)
    with store.held(123_456) as state:
        assert len(state) == 0
        state["versions"] = ConfigRecord({"base-version": 3})
        state["frozen"] = ArrayRecord({"a": torch.arange(6.0).reshape(2, 3)})
    assert store.path(123_456) == tmp_path / "123" / "123456.state"
    with store.held(123_456) as state:
        assert state["versions"]["base-version"] == 3
        held = torch.from_numpy(state["frozen"]["a"].numpy())
        assert torch.equal(held, torch.arange(6.0).reshape(2, 3))
    assert len(store.load(7)) == 0  # another client holds nothing


def test_only_clients_that_hold_state_get_a_file(tmp_path):
    store = ClientStore(tmp_path)
    for client in range(50):
        with store.held(client):
            pass
    assert not list(tmp_path.rglob("*.state"))


def test_a_round_that_fails_leaves_the_state_it_started_from(tmp_path):
    store = ClientStore(tmp_path)
    with store.held(1) as state:
        state["versions"] = ConfigRecord({"base-version": 1})
    with pytest.raises(RuntimeError), store.held(1) as state:
        state["versions"] = ConfigRecord({"base-version": 2})
        raise RuntimeError("training failed")
    assert store.load(1)["versions"]["base-version"] == 1


def test_a_damaged_state_file_is_refused_not_reset(tmp_path):
    store = ClientStore(tmp_path)
    with store.held(9) as state:
        state["versions"] = ConfigRecord({"base-version": 4})
    path = store.path(9)
    path.write_bytes(path.read_bytes()[:-5] + b"\xff\xff")
    with pytest.raises(ClientStateCorrupt, match=r"client 9's state file .* cannot be read"):
        store.load(9)


def _increment(root: str, times: int) -> None:
    store = ClientStore(root)
    for _ in range(times):
        with store.held(42) as state:
            count = state["count"]["n"] if "count" in state else 0
            state["count"] = ConfigRecord({"n": count + 1})


def test_two_processes_serving_one_client_take_turns(tmp_path):
    """A client still running a timed-out round and the same client sampled again (two Ray
    actors): every load-to-save is exclusive, so no update is lost."""
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_increment, args=(str(tmp_path), 30)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert ClientStore(tmp_path).load(42)["count"]["n"] == 60
