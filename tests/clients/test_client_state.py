import pytest
import torch
from flwr.app import RecordDict

from fedpeft.clients import client_state
from fedpeft.clients.client_state import StateMismatch


def _stack(seed):
    g = torch.Generator().manual_seed(seed)
    return {"l.lora_A": torch.randn(3, 5, generator=g), "l.lora_B": torch.randn(4, 3, generator=g)}


def test_stacks_are_kept_in_order_and_gaps_refused():
    state = RecordDict()
    payload = {f"stack.{v}.{k}": t for v in (1, 2) for k, t in _stack(v).items()}
    payload["head.w"] = torch.ones(2)
    plain, stacks, frozen = client_state.split_payload(payload)
    assert set(plain) == {"head.w"} and sorted(stacks) == [1, 2] and not frozen
    config = {"stack-from": 0, "stack-to": 2}
    client_state.receive(state, config, stacks, frozen)
    held = client_state.held_stacks(state)
    assert len(held) == 2 and torch.equal(held[1]["l.lora_A"], _stack(2)["l.lora_A"])
    assert client_state.version_metrics(state, config) == {"base-version": 2}
    with pytest.raises(StateMismatch, match="base version"):
        client_state.receive(RecordDict(), {"stack-from": 1, "stack-to": 2}, {2: _stack(2)}, {})


def test_frozen_factors_are_remembered_and_required():
    state = RecordDict()
    config = {"frozen-version": 1}
    client_state.receive(state, config, {}, {"l.lora_A": torch.ones(2, 2)})
    client_state.receive(state, config, {}, {})
    assert torch.equal(client_state.held_frozen(state)["l.lora_A"], torch.ones(2, 2))
    assert client_state.version_metrics(state, config) == {"frozen-version": 1}
    with pytest.raises(StateMismatch, match="frozen-version"):
        client_state.receive(RecordDict(), config, {}, {})


def test_frozen_from_updates_some_factors_of_the_held_version():
    """frozen-from = v > 0 merges into what the node holds at v; 0 replaces; a gap is refused."""
    state, a, b = RecordDict(), torch.ones(2, 3), torch.ones(4, 2)
    client_state.receive(state, {"frozen-from": 0, "frozen-version": 1}, {}, {"l.lora_B": b})
    client_state.receive(state, {"frozen-from": 1, "frozen-version": 2}, {}, {"l.lora_A": a})
    held = client_state.held_frozen(state)
    assert torch.equal(held["l.lora_A"], a) and torch.equal(held["l.lora_B"], b)
    client_state.receive(state, {"frozen-from": 2, "frozen-version": 3}, {}, {"l.lora_B": 2 * b})
    assert torch.equal(client_state.held_frozen(state)["l.lora_B"], 2 * b)
    client_state.receive(state, {"frozen-from": 0, "frozen-version": 5}, {}, {"l.lora_A": 3 * a})
    assert set(client_state.held_frozen(state)) == {"l.lora_A"}  # from 0: replaced
    with pytest.raises(StateMismatch, match="updates version 1"):
        client_state.receive(RecordDict(), {"frozen-from": 1, "frozen-version": 2}, {}, {"l": a})
