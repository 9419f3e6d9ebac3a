import pytest
import torch

from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from fedpeft.strategies import FFALoRA
from tests.strategies.conftest import (
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    client_updates,
    global_adapter,
    reference_average,
    reply,
)


def test_only_b_and_head_cross_the_network():
    strategy = FFALoRA(global_adapter(), {}, max_num_examples=100)
    assert all(k.endswith("lora_B") or k.startswith("head.") for k in strategy.up_keys())
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([1, 2])))
    for msg in messages:
        assert not any(k.endswith("lora_A") for k in msg.content["arrays"])
    assert strategy.stats.bytes_down == 2 * (LAYERS * R * D_OUT + 2 * D_OUT + 2) * 4


def test_aggregation_is_exact_for_the_shared_a():
    start = global_adapter()
    strategy = FFALoRA(start, {}, max_num_examples=100)
    updates = client_updates(strategy.up_keys(), 4, seed=5)
    weights = [3, 9, 27, 81]
    strategy.aggregate_train(2, [reply(i, u, w) for i, (u, w) in enumerate(zip(updates, weights))])
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for layer in range(LAYERS):
        a = start[f"enc.{layer}.q.lora_A"].double()
        assert torch.equal(
            strategy.global_adapter[f"enc.{layer}.q.lora_A"], start[f"enc.{layer}.q.lora_A"]
        )
        ideal = sum(pk * u[f"enc.{layer}.q.lora_B"].double() @ a for pk, u in zip(p, updates))
        merged = strategy.global_adapter[f"enc.{layer}.q.lora_B"].double() @ a
        torch.testing.assert_close(merged, ideal, atol=1e-5, rtol=1e-5)
    ref = reference_average(updates, weights)
    torch.testing.assert_close(
        strategy.global_adapter["head.classifier.bias"].double(),
        ref["head.classifier.bias"],
        atol=1e-6,
        rtol=1e-6,
    )


def test_ffa_lora_has_its_own_alpha_and_lr_as_defaults_the_command_line_overrides():
    """Its config sets adapter.alpha 16 and train.lr 5e-3 instead of LoRA's; overrides win."""
    root = compose_config(["strategy=fedavg"])
    task = build_task(compose_config(["strategy=ffa_lora", "adapter.alpha=12"]), 2)
    assert task["adapter"]["alpha"] == 12 and task["train"]["lr"] == 5e-3 != root.train.lr
    task = build_task(compose_config(["strategy=ffa_lora", "train.lr=1e-3"]), 2)
    assert task["adapter"]["alpha"] == 16.0 and task["train"]["lr"] == 1e-3
    fedsvd = build_task(compose_config(["strategy=fedsvd", "train.lr=1e-3"]), 2)
    assert fedsvd["train"]["lr"] == 1e-3 and fedsvd["adapter"]["train_head"] is False
    assert build_task(compose_config(["strategy=fedsvd"]), 2)["train"]["lr"] == 5e-3
    fedavg = build_task(compose_config(["strategy=fedavg", "adapter.alpha=64"]), 2)
    assert fedavg["adapter"]["alpha"] == 64 and fedavg["train"]["lr"] == root.train.lr


@pytest.mark.parametrize(
    ("gone", "now"),
    [("lr=0.1", "train.lr"), ("alpha=4", "adapter.alpha"), ("train_head=false", "adapter.train")],
)
def test_the_old_shadow_keys_are_refused_naming_the_key_that_holds_the_value(gone, now):
    with pytest.raises(ConfigError, match=f"strategy.{gone.split('=')[0]} is gone.*{now}"):
        compose_config(["strategy=ffa_lora", f"strategy.{gone}"])
