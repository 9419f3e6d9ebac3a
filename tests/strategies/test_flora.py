import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedpeft import adapters
from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.clients.client_state import StateMismatch
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.runtime import model_runtime
from fedpeft.strategies import FLoRA
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import D_IN, D_OUT, LAYERS, FakeGrid, global_adapter, reply

RANKS = [2, 5, 3]
ALPHA = 8.0


def _strategy(**kw):
    task = {"adapter": {"rank": 4, "alpha": ALPHA}, "adapter_seed": 0}
    return FLoRA(global_adapter(), task, train_head=False, max_num_examples=100, ranks=RANKS, **kw)


def _updates(strategy, nodes, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s.shape, generator=g) for k, s in strategy.up_specs(n).items()}
        for n in nodes
    ]


@pytest.mark.parametrize("scaling", ["per_rank", "shared"])
def test_stack_is_exact_with_heterogeneous_ranks(scaling):
    strategy = _strategy(scaling=scaling)
    nodes = [7, 3, 9]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    for msg, r in zip(messages, RANKS):
        alpha_k = ALPHA * r / 4 if scaling == "per_rank" else ALPHA  # adapter.rank = 4
        assert msg.content["config"]["adapter-alpha"] == pytest.approx(alpha_k, rel=1e-12)
    updates = _updates(strategy, nodes, seed=2)
    weights = [10, 20, 70]
    strategy.aggregate_train(1, [reply(n, u, w) for n, u, w in zip(nodes, updates, weights)])
    p = torch.tensor(weights, dtype=torch.float64) / 100
    (stack,) = strategy.stacks
    for layer in range(LAYERS):
        name = f"enc.{layer}.q"
        ideal = sum(
            pk
            * ((ALPHA / 4) if scaling == "per_rank" else (ALPHA / u[f"{name}.lora_A"].shape[0]))
            * u[f"{name}.lora_B"].double()
            @ u[f"{name}.lora_A"].double()
            for pk, u in zip(p, updates)
        )
        merged = stack[f"{name}.lora_B"].double() @ stack[f"{name}.lora_A"].double()
        torch.testing.assert_close(merged, ideal, atol=1e-5, rtol=1e-5)
        assert stack[f"{name}.lora_A"].shape == (sum(RANKS), D_IN)


def test_bytes_match_the_communication_table():
    strategy = _strategy(fraction=0.5, seed=1)
    nodes = [1, 2, 3, 4]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    assert strategy.stats.bytes_down == 0  # no stack yet, no head, fresh LoRA from a seed
    sampled = [m.metadata.dst_node_id for m in messages]
    ranks = [strategy.rank_of(n) for n in sampled]
    strategy.aggregate_train(
        1, [reply(n, u, 5) for n, u in zip(sampled, _updates(strategy, sampled, 1))]
    )
    assert strategy.stats.bytes_up == sum(ranks) * (D_IN + D_OUT) * LAYERS * 4
    again = list(strategy.configure_train(2, None, {}, FakeGrid(sampled)))
    per_client = sum(ranks) * (D_IN + D_OUT) * LAYERS * 4  # sum r_j (d_in + d_out), per layer
    assert strategy.stats.bytes_down == len(again) * per_client
    for msg in again:
        assert msg.content["config"]["stack-from"] == 0  # replies here report no version


def test_failed_node_is_sent_everything_again():
    strategy = _strategy()
    list(strategy.configure_train(1, None, {}, FakeGrid([1])))
    strategy.roster.versions[1] = 3
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    strategy.aggregate_train(1, [Message(Error(code=1, reason="mismatch"), reply_to=sent)])
    assert strategy.roster.versions[1] == 0


def _bases(runtime):
    return {k: v.detach().clone() for k, v in adapters.base_weights(runtime.model).items()}


def test_catch_up_and_restart_end_with_the_same_base(data_dir):
    """Node 2 misses rounds 2-3, node 3 restarts before round 4: all end with node 1's base."""
    overrides = [*FAST_RUN, "strategy=flora", "federation.num_clients=3"]
    fed = prepare(
        compose_config(
            [
                *overrides,
                "strategy.params.ranks=[2,8]",
                "train.batch_size=4",
                "federation.local_steps=1",
            ]
        )
    )
    strategy, evaluator = fed.strategy, fed.evaluator
    nodes = {1: 0, 2: 1, 3: 2}
    contexts = {
        n: Context(1, n, {"partition-id": p, "num-partitions": 3}, RecordDict(), {})
        for n, p in nodes.items()
    }
    schedule = {1: [1, 2, 3], 2: [1, 3], 3: [1], 4: [1, 2, 3], 5: [1, 2, 3]}
    bases, server_base = {}, None
    for server_round, sampled in schedule.items():
        if server_round == 4:
            contexts[3] = Context(1, 3, {"partition-id": 2, "num-partitions": 3}, RecordDict(), {})
        messages = strategy.configure_train(
            server_round, ArrayRecord(), ConfigRecord(), FakeGrid(sampled)
        )
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                replies.append(train(msg, contexts[node]))
            except StateMismatch as exc:
                assert server_round == 4 and node == 3 and "base version" in str(exc)
                replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
                continue
            if server_round == 5:
                task = json.loads(str(msg.content["config"]["task"]))
                task["adapter"]["rank"] = int(msg.content["config"]["adapter-rank"])
                task["adapter"]["alpha"] = float(msg.content["config"]["adapter-alpha"])
                bases[node] = _bases(model_runtime(task))
        strategy.aggregate_train(server_round, replies)
        assert strategy.stats.replied == len(sampled) - (server_round == 4)
        if server_round == 4:
            evaluator(strategy.global_adapter)
            server_base = _bases(evaluator.runtime)
    assert len(strategy.stacks) == 5 and strategy.roster.versions == {1: 4, 2: 4, 3: 4}
    pristine = evaluator.runtime.pristine
    for key, value in bases[1].items():
        assert not torch.allclose(value, pristine[key])  # four stacks were merged
        torch.testing.assert_close(bases[2][key], value, atol=1e-6, rtol=0)
        torch.testing.assert_close(bases[3][key], value, atol=1e-6, rtol=0)
        torch.testing.assert_close(server_base[key], value, atol=1e-6, rtol=0)


def test_simulation_and_saved_adapter(tmp_path, data_dir):
    run = [*FAST_RUN, "strategy=flora", "strategy.params.ranks=[4,8]", f"run_dir={tmp_path}"]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2
    layers, hidden, head = 4, 64, 2 * 64 + 2
    up = [layers * r * 2 * hidden + head for r in (4, 8)]  # A_k, B_k of rank r_k, and the head
    assert summary["bytes_up"] == 2 * sum(up) * 4
    stack = layers * 12 * 2 * hidden  # round 2: round 1's module, sum r_j = 12, to both clients
    assert summary["bytes_down"] == (2 * head + 2 * (head + stack)) * 4
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
