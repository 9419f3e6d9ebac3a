import pytest
import torch

from fedpeft.strategies import FedAvgLoRA, LoRAFAIR
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


def _aggregate(strategy, updates, weights):
    strategy.aggregate_train(1, [reply(i, u, w) for i, (u, w) in enumerate(zip(updates, weights))])
    return strategy.global_adapter


def _cos(x, y):
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_correction_moves_towards_the_ideal_update():
    updates = client_updates(LoRAFAIR(global_adapter(), {}).up_keys(), 4, seed=9)
    weights = [1, 2, 3, 4]
    p = torch.tensor(weights, dtype=torch.float64) / 10
    fair = _aggregate(LoRAFAIR(global_adapter(), {}, max_num_examples=100), updates, weights)
    avg = _aggregate(FedAvgLoRA(global_adapter(), {}, max_num_examples=100), updates, weights)
    for n in range(LAYERS):
        ideal = sum(
            pk * u[f"enc.{n}.q.lora_B"].double() @ u[f"enc.{n}.q.lora_A"].double()
            for pk, u in zip(p, updates)
        )
        fair_w = fair[f"enc.{n}.q.lora_B"].double() @ fair[f"enc.{n}.q.lora_A"].double()
        avg_w = avg[f"enc.{n}.q.lora_B"].double() @ avg[f"enc.{n}.q.lora_A"].double()
        assert torch.equal(fair[f"enc.{n}.q.lora_A"], avg[f"enc.{n}.q.lora_A"])
        assert _cos(ideal, fair_w) >= _cos(ideal, avg_w) - 1e-9


def test_huge_lambda_gives_fedavg_back():
    updates = client_updates(LoRAFAIR(global_adapter(), {}).up_keys(), 3, seed=4)
    fair = _aggregate(
        LoRAFAIR(global_adapter(), {}, max_num_examples=100, lam=1e6, lr=1e-8), updates, [1, 1, 2]
    )
    avg = _aggregate(FedAvgLoRA(global_adapter(), {}, max_num_examples=100), updates, [1, 1, 2])
    for key in avg:
        torch.testing.assert_close(fair[key], avg[key], atol=1e-5, rtol=1e-5)


def test_closed_form_variant_runs_and_differs():
    updates = client_updates(LoRAFAIR(global_adapter(), {}).up_keys(), 3, seed=4)
    cosine = _aggregate(LoRAFAIR(global_adapter(), {}, max_num_examples=100), updates, [1, 2, 3])
    closed = _aggregate(
        LoRAFAIR(global_adapter(), {}, max_num_examples=100, variant="closed_form"),
        updates,
        [1, 2, 3],
    )
    assert not torch.allclose(cosine["enc.0.q.lora_B"], closed["enc.0.q.lora_B"])
    with pytest.raises(ValueError, match="variant"):
        LoRAFAIR(global_adapter(), {}, variant="nope")


def test_bytes_match_the_communication_table():
    strategy = LoRAFAIR(global_adapter(), {}, train_head=False, max_num_examples=100)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([1, 2])))
    assert strategy.stats.bytes_down == 2 * LAYERS * R * (D_IN + D_OUT) * 4
    updates = client_updates(strategy.up_keys(), 2)
    strategy.aggregate_train(
        1, [reply(m.metadata.dst_node_id, u, 5) for m, u in zip(messages, updates)]
    )
    assert strategy.stats.bytes_up == 2 * LAYERS * R * (D_IN + D_OUT) * 4
