import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedpeft import lowrank
from fedpeft.clients.client_app import train
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.runtime import model_runtime
from fedpeft.strategies import FedAvgLoRA, LoRAFAIR
from tests.conftest import FAST_RUN
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


@pytest.mark.parametrize("scaling", ["per_rank", "shared"])
def test_mixed_ranks_with_real_clients(scaling, data_dir):
    """Two tiny_bert clients of ranks 2 and 8 train at their own alpha; LoRA-FAIR takes both."""
    run = [
        *FAST_RUN,
        "strategy=lora_fair",
        "adapter.rank=8",
        "strategy.params.ranks=[2,8]",
        f"strategy.params.scaling={scaling}",
        "federation.local_steps=1",
        "train.batch_size=4",
    ]
    fed = prepare(compose_config(run))
    strategy = fed.strategy
    contexts = {
        n: Context(1, n, {"partition-id": n - 1, "num-partitions": 2}, RecordDict(), {})
        for n in (1, 2)
    }
    for server_round in (1, 2):
        messages = list(
            strategy.configure_train(server_round, None, ConfigRecord(), FakeGrid([1, 2]))
        )
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        strategy.aggregate_train(server_round, replies)
        assert strategy.stats.replied == 2, strategy.stats.rejected
        assert strategy.last_info["layers"] == 4 and strategy.last_info["iterations"] >= 1
        assert strategy.last_info["final_loss"] <= strategy.last_info["initial_loss"]
    for msg in messages:
        config = msg.content["config"]
        task = json.loads(str(config["task"]))
        task["adapter"].update(rank=config["adapter-rank"], alpha=config["adapter-alpha"])
        layers = [m for m in model_runtime(task).model.modules() if hasattr(m, "lora_A")]
        expected = 16 / 8 if scaling == "per_rank" else 16 / config["adapter-rank"]
        assert layers and all(m.scaling["default"] == pytest.approx(expected) for m in layers)
    assert all(strategy.global_adapter[k].shape[0] == 8 for k in strategy.factor_keys("lora_A"))
    assert 0.0 <= fed.evaluator(strategy.global_adapter)["accuracy"] <= 1.0


def test_layer_groups_share_one_solve_and_every_group_is_reported():
    """Two layer shapes: one stopping rule over both (as lowrank's), info for each group."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a.q": (12, 16), "a.v": (12, 16), "b.q": (20, 8)}
    adapter = {}
    for name, (d_out, d_in) in shapes.items():
        adapter[f"{name}.lora_A"] = torch.randn(R, d_in, generator=g)
        adapter[f"{name}.lora_B"] = torch.randn(d_out, R, generator=g)
    strategy = LoRAFAIR(adapter, {}, train_head=False, max_num_examples=100)
    updates = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in adapter.items()}
        for _ in range(3)
    ]
    strategy.aggregate_train(1, [reply(i, u, 5 + i) for i, u in enumerate(updates)])
    info = strategy.last_info
    assert [group["layers"] for group in info["groups"]] == [2, 1] and info["layers"] == 3
    weights = lowrank.normalize_weights([5, 6, 7])
    stacks = [
        tuple(
            torch.stack([torch.stack([u[f"{n}.{f}"] for n in names]) for u in updates])
            for f in ("lora_A", "lora_B")
        )
        for names in (["a.q", "a.v"], ["b.q"])
    ]
    results, ref = lowrank.lora_fair_residual_groups(stacks, weights)
    assert info["iterations"] == ref["iterations"]
    for names, (_, b_prime) in zip((["a.q", "a.v"], ["b.q"]), results):
        for i, name in enumerate(names):
            assert torch.equal(strategy.global_adapter[f"{name}.lora_B"], b_prime[i])
