import pytest
import torch

from fedpeft.strategies import FedAvgLoRA
from tests.strategies.conftest import (
    D_IN,
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    client_updates,
    error_reply,
    global_adapter,
    reference_average,
    reply,
)


def _strategy(**kw):
    return FedAvgLoRA(global_adapter(), {"kind": "lora"}, max_num_examples=1000, **kw)


def test_averages_every_factor_against_float64_reference():
    strategy = _strategy()
    updates = client_updates(strategy.up_keys(), 3)
    weights = [10, 30, 60]
    arrays, metrics = strategy.aggregate_train(
        1, [reply(n, u, w) for n, u, w in zip([4, 5, 6], updates, weights)]
    )
    ref = reference_average(updates, weights)
    for key, value in ref.items():
        torch.testing.assert_close(
            strategy.global_adapter[key].double(), value, atol=1e-6, rtol=1e-6
        )
    assert set(arrays.keys()) == set(global_adapter())
    assert metrics["num-replies"] == 3


def test_bad_and_failed_replies_are_dropped_with_reasons():
    strategy = _strategy()
    updates = client_updates(strategy.up_keys(), 3)
    poisoned = {k: v.clone() for k, v in updates[2].items()}
    poisoned["enc.0.q.lora_B"][0, 0] = float("nan")
    replies = [
        reply(1, updates[0], 5),
        reply(2, updates[1], 15),
        reply(3, poisoned, 5),
        error_reply(4, "client crashed"),
    ]
    strategy.aggregate_train(1, replies)
    ref = reference_average(updates[:2], [5, 15])
    for key, value in ref.items():
        torch.testing.assert_close(
            strategy.global_adapter[key].double(), value, atol=1e-6, rtol=1e-6
        )
    assert "NaN" in strategy.stats.rejected[3]
    assert strategy.stats.failed[4] == "client crashed"
    assert strategy.stats.replied == 2


def test_too_few_valid_replies_keep_the_global():
    strategy = _strategy(min_clients=2)
    before = {k: v.clone() for k, v in strategy.global_adapter.items()}
    updates = client_updates(strategy.up_keys(), 1)
    assert strategy.aggregate_train(1, [reply(1, updates[0], 5)]) == (None, None)
    assert all(torch.equal(before[k], strategy.global_adapter[k]) for k in before)


def test_sampling_payload_and_bytes_match_the_communication_table():
    strategy = _strategy(fraction=0.5, min_clients=1, seed=3)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(range(1, 9))))
    assert len(messages) == 4
    head = 2 * D_OUT + 2
    per_client = LAYERS * R * (D_IN + D_OUT) + head
    for msg in messages:
        arrays = msg.content["arrays"]
        assert set(arrays.keys()) == set(global_adapter())
        assert msg.content["config"]["server-round"] == 1
    assert strategy.stats.bytes_down == 4 * per_client * 4
    updates = client_updates(strategy.up_keys(), 4)
    strategy.aggregate_train(
        1, [reply(m.metadata.dst_node_id, u, 5) for m, u in zip(messages, updates)]
    )
    assert strategy.stats.bytes_up == 4 * per_client * 4


def test_sampling_is_reproducible_with_the_seed():
    grid = FakeGrid(range(100))
    pick = lambda seed: [
        m.metadata.dst_node_id  # noqa: E731
        for m in _strategy(fraction=0.1, seed=seed).configure_train(1, None, {}, grid)
    ]
    assert pick(1) == pick(1) and pick(1) != pick(2)


RANKS = [1, 3, 4]
ALPHA = 16.0


def _hetero(scaling: str):
    task = {"kind": "lora", "adapter": {"rank": R, "alpha": ALPHA}}
    return FedAvgLoRA(global_adapter(), task, max_num_examples=1000, ranks=RANKS, scaling=scaling)


def _hetero_updates(strategy, nodes, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s.shape, generator=g) for k, s in strategy.up_specs(n).items()}
        for n in nodes
    ]


@pytest.mark.parametrize("scaling", ["per_rank", "shared"])
def test_zero_padded_ranks_send_each_node_the_truncated_global(scaling):
    strategy = _hetero(scaling)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([5, 6, 7])))
    head = 2 * D_OUT + 2
    assert strategy.stats.bytes_down == sum(LAYERS * r * (D_IN + D_OUT) + head for r in RANKS) * 4
    g = strategy.global_adapter
    for msg, r in zip(messages, RANKS):
        config = msg.content["config"]
        assert config["adapter-rank"] == r
        alpha_k = ALPHA * r / R if scaling == "per_rank" else ALPHA
        assert config["adapter-alpha"] == pytest.approx(alpha_k, rel=1e-12)
        arrays = {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()}
        for layer in range(LAYERS):
            a, b = arrays[f"enc.{layer}.q.lora_A"], arrays[f"enc.{layer}.q.lora_B"]
            assert a.shape == (r, D_IN) and b.shape == (D_OUT, r)
            # the client's scaling alpha_k / r makes its model the rank-r truncation of the global
            client = (alpha_k / r) * b.double() @ a.double()
            truncated = (
                (ALPHA / R)
                * g[f"enc.{layer}.q.lora_B"][:, :r].double()
                @ (g[f"enc.{layer}.q.lora_A"][:r].double())
            )
            torch.testing.assert_close(client, truncated, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scaling", ["per_rank", "shared"])
def test_zero_padded_average_against_float64_reference(scaling):
    strategy = _hetero(scaling)
    nodes = [5, 6, 7]
    list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    updates = _hetero_updates(strategy, nodes, seed=4)
    weights = [10, 30, 60]
    strategy.aggregate_train(1, [reply(n, u, w) for n, u, w in zip(nodes, updates, weights)])
    assert strategy.stats.replied == 3
    p = torch.tensor(weights, dtype=torch.float64) / 100
    for layer in range(LAYERS):
        name = f"enc.{layer}.q"
        a_ref = torch.zeros(R, D_IN, dtype=torch.float64)
        b_ref = torch.zeros(D_OUT, R, dtype=torch.float64)
        for pk, u, r in zip(p, updates, RANKS):
            frame = R / r if scaling == "shared" else 1.0  # s_k / s
            a_ref[:r] += pk * u[f"{name}.lora_A"].double()
            b_ref[:, :r] += pk * u[f"{name}.lora_B"].double() * frame
        torch.testing.assert_close(strategy.global_adapter[f"{name}.lora_A"].double(), a_ref)
        torch.testing.assert_close(
            strategy.global_adapter[f"{name}.lora_B"].double(), b_ref, rtol=1e-6, atol=1e-6
        )


def test_zero_padded_ranks_reject_wrong_shapes_and_too_large_ranks():
    strategy = _hetero("per_rank")
    list(strategy.configure_train(1, None, {}, FakeGrid([5, 6, 7])))
    full_rank = client_updates(strategy.up_keys(), 1)[0]
    strategy.aggregate_train(1, [reply(5, full_rank, 10)])
    assert 5 in strategy.stats.rejected and strategy.stats.replied == 0
    with pytest.raises(ValueError, match=f"set adapter.rank={R + 1}"):
        _strategy(ranks=[R + 1, 2])
