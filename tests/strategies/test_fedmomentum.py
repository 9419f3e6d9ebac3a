"""FedMomentum (docs/algorithms.md §13): the top-r part carried as the next LoRA, the tail merged
into the versioned base; dead slots re-seeded; refusals; a federation through the real ClientApp."""

import pytest
import torch

from fedpeft import lowrank
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import prepare
from fedpeft.strategies import FedMomentum
from tests.conftest import FAST_RUN, in_process_rounds
from tests.strategies.conftest import LAYERS, R, client_updates, global_adapter, reply

WEIGHTS = [4, 8, 12]
TASK = {"adapter": {"alpha": 8.0}, "seed": 3}  # s = alpha / R = 2


def _round(strategy, server_round, seed):
    updates = client_updates(strategy.up_keys(), 3, seed=seed)
    strategy.aggregate_train(
        server_round, [reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))]
    )
    return updates


@pytest.mark.parametrize("energy", [1.0, 0.9999])
def test_the_global_model_is_the_clients_average_up_to_the_dropped_energy(energy):
    strategy = FedMomentum(global_adapter(), TASK, train_head=True, max_num_examples=100,
                           energy=energy)  # fmt: skip
    updates = _round(strategy, 1, seed=4)
    (module,) = strategy.base_stacks()
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / 24
    for n in range(LAYERS):
        key = f"enc.{n}.q"
        dense = sum(
            float(p[i]) * 2.0 * u[f"{key}.lora_B"].double() @ u[f"{key}.lora_A"].double()
            for i, u in enumerate(updates)
        )
        kept = (
            2.0
            * strategy.global_adapter[f"{key}.lora_B"].double()
            @ strategy.global_adapter[f"{key}.lora_A"].double()
        )
        if f"{key}.lora_A" in module:
            kept = kept + module[f"{key}.lora_B"].double() @ module[f"{key}.lora_A"].double()
        rel = float(torch.linalg.norm(kept - dense) / torch.linalg.norm(dense))
        assert rel < (1e-6 if energy == 1.0 else 1.1 * (1 - energy) ** 0.5 + 1e-6)
    head = sum(float(p[i]) * u["head.classifier.weight"].double() for i, u in enumerate(updates))
    assert torch.allclose(strategy.global_adapter["head.classifier.weight"].double(), head,
                          atol=1e-6)  # fmt: skip


def test_the_residual_goes_down_to_every_node_once_and_is_counted():
    strategy = FedMomentum(global_adapter(), TASK, train_head=False, max_num_examples=100)
    _round(strategy, 1, seed=2)
    tensors, config = strategy.node_payload(9)  # a node that took no part yet
    stacked = [k for k in tensors if k.startswith("stack.")]
    assert config == {"stack-from": 0, "stack-to": 1} and len(stacked) == 2 * LAYERS
    rho = tensors["stack.1.enc.0.q.lora_A"].shape[0]
    assert 1 <= rho <= 2 * R  # at most (K - 1) r components beyond the top r


def test_dead_slots_get_fresh_a_rows_and_zero_b_columns():
    """Replies that did not move a layer (zero factors) leave its slots dead: A's rows are
    re-seeded, deterministically per (seed, round, layer, slot), so that they train again."""
    strategy = FedMomentum(global_adapter(), TASK, train_head=False, max_num_examples=100)
    updates = client_updates(strategy.up_keys(), 3, seed=5)
    for u in updates:
        u["enc.1.q.lora_B"] = torch.zeros_like(u["enc.1.q.lora_B"])
    strategy.aggregate_train(
        1, [reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))]
    )
    a, b = strategy.global_adapter["enc.1.q.lora_A"], strategy.global_adapter["enc.1.q.lora_B"]
    assert torch.all(b == 0) and torch.all(a.abs().sum(-1) > 0) and strategy.reseeded == R
    assert torch.all(a.abs() <= 1 / a.shape[-1] ** 0.5)  # Kaiming-uniform's bound
    again = FedMomentum(global_adapter(), TASK, train_head=False, max_num_examples=100)
    again.aggregate_train(1, [reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))])
    assert torch.equal(again.global_adapter["enc.1.q.lora_A"], a)


def test_the_exported_lora_is_the_whole_model():
    strategy = FedMomentum(global_adapter(), TASK, train_head=False, max_num_examples=100,
                           energy=1.0)  # fmt: skip
    _round(strategy, 1, seed=6)
    _round(strategy, 2, seed=7)
    tensors, rank = strategy.export_lora()
    for n in range(LAYERS):
        key = f"enc.{n}.q"
        whole = sum(m[f"{key}.lora_B"] @ m[f"{key}.lora_A"] for m in strategy.base_stacks()
                    if f"{key}.lora_A" in m)  # fmt: skip
        whole = (
            whole
            + 2.0
            * strategy.global_adapter[f"{key}.lora_B"]
            @ strategy.global_adapter[f"{key}.lora_A"]
        )
        assert tensors[f"{key}.lora_A"].shape[0] == rank
        assert torch.allclose(tensors[f"{key}.lora_B"] @ tensors[f"{key}.lora_A"], whole, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.params.energy=0"], "energy=0 must be in \\(0, 1\\]"),
        (["+strategy.params.ranks=[4,8]"], "fedmomentum cannot train clients at different ranks"),
        (["server_opt.name=fedadam"], "server_opt.name=fedadam with strategy=fedmomentum"),
    ],
)
def test_what_fedmomentum_cannot_run_with_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["strategy=fedmomentum", *overrides])


def test_a_federation_trains_and_every_node_holds_the_same_base(tmp_path, data_dir):
    fed = prepare(compose_config([*FAST_RUN, "strategy=fedmomentum", "federation.rounds=3"]))
    stats = in_process_rounds(fed, rounds=3, state_dir=tmp_path)
    assert [s["replied"] for s in stats] == [2, 2, 2]
    assert len(fed.strategy.base_stacks()) >= 1
    assert 0.0 < fed.evaluator(fed.strategy.global_adapter)["accuracy"] <= 1.0
    assert all(torch.isfinite(t).all() for t in fed.strategy.global_adapter.values())
    assert lowrank.normalize_weights([1, 1]).sum() == 1
