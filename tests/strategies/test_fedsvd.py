import pytest
import torch

from fedpeft.strategies import FedSVD
from tests.strategies.conftest import (
    D_IN,
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    client_updates,
    global_adapter,
    reply,
)


def _run_round(strategy, server_round, seed):
    updates = client_updates(strategy.up_keys(), 3, seed=seed)
    weights = [4, 8, 12]
    strategy.aggregate_train(
        server_round, [reply(i, u, w) for i, (u, w) in enumerate(zip(updates, weights))]
    )
    return updates, torch.tensor(weights, dtype=torch.float64) / 24


@pytest.mark.parametrize("server_round", [1, 2])
def test_refactorisation_preserves_product_and_orthonormalises_a(server_round):
    strategy = FedSVD(global_adapter(), {}, train_head=False, max_num_examples=100)
    if server_round == 2:
        _run_round(strategy, 1, seed=11)  # A already has orthonormal rows: the thin-B path
    a_before = {n: strategy.global_adapter[f"enc.{n}.q.lora_A"].double() for n in range(LAYERS)}
    updates, p = _run_round(strategy, server_round, seed=3)
    for n in range(LAYERS):
        b_bar = sum(pk * u[f"enc.{n}.q.lora_B"].double() for pk, u in zip(p, updates))
        dense = b_bar @ a_before[n]
        b, a = (strategy.global_adapter[f"enc.{n}.q.lora_{f}"].double() for f in "BA")
        rel = torch.linalg.norm(b @ a - dense) / torch.linalg.norm(dense)
        assert rel < 1e-5
        assert torch.linalg.norm(a @ a.T - torch.eye(R, dtype=torch.float64)) < 1e-5
        norms = b.norm(dim=0)
        assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # singular values, descending, in B


def test_refactor_every_two_keeps_a_between():
    strategy = FedSVD(
        global_adapter(), {}, train_head=False, max_num_examples=100, refactor_every=2
    )
    a0 = strategy.global_adapter["enc.0.q.lora_A"].clone()
    _run_round(strategy, 1, seed=1)
    assert torch.equal(strategy.global_adapter["enc.0.q.lora_A"], a0)
    _run_round(strategy, 2, seed=2)
    assert not torch.equal(strategy.global_adapter["enc.0.q.lora_A"], a0)


def test_bytes_match_the_communication_table():
    strategy = FedSVD(global_adapter(), {}, train_head=False, max_num_examples=100)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([1, 2, 3])))
    assert strategy.stats.bytes_down == 3 * LAYERS * R * (D_IN + D_OUT) * 4
    updates = client_updates(strategy.up_keys(), 3)
    strategy.aggregate_train(
        1, [reply(m.metadata.dst_node_id, u, 5) for m, u in zip(messages, updates)]
    )
    assert strategy.stats.bytes_up == 3 * LAYERS * R * D_OUT * 4
    assert not any(k.startswith("head.") for k in strategy.up_keys())


def test_bad_refactor_every():
    with pytest.raises(ValueError, match="refactor_every"):
        FedSVD(global_adapter(), {}, refactor_every=0)
