"""FedEx-LoRA (docs/algorithms.md §7): exact effective weight, residual factors, bytes, catch-up."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft import adapters, lowrank
from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.clients.client_state import StateMismatch
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.runtime import model_runtime
from fedpeft.strategies import FedExLoRA
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import D_IN, D_OUT, LAYERS, FakeGrid, R, global_adapter, reply


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 5),
    r=st.integers(1, 4),
    layers=st.integers(1, 3),
    shape=st.sampled_from([(6, 9), (16, 16), (24, 10)]),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    s=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_effective_weight_is_the_average_of_the_clients(k, r, layers, shape, scale, s, seed):
    """(a) W0 + s R + s B_bar A_bar = sum p_k (W0 + s B_k A_k); (b) B_R A_R = s R, rank (K-1)r."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(k, layers, r, d_in, generator=g, dtype=torch.float64)
    b = scale * torch.randn(k, layers, d_out, r, generator=g, dtype=torch.float64)
    w0 = torch.randn(layers, d_out, d_in, generator=g, dtype=torch.float64)
    p = lowrank.normalize_weights(torch.randint(1, 500, (k,), generator=g))
    a_bar, b_bar, residual = lowrank.fedex_aggregate(a, b, p, s)
    clients = sum(p[i] * (w0 + s * b[i] @ a[i]) for i in range(k))
    if k == 1:
        assert residual is None  # (c) one client: nothing to send
        base = w0
    else:
        a_r, b_r = residual
        assert a_r.shape == (layers, (k - 1) * r, d_in) and b_r.shape == (
            layers,
            d_out,
            (k - 1) * r,
        )
        ideal_r = s * (sum(p[i] * b[i] @ a[i] for i in range(k)) - b_bar @ a_bar)
        torch.testing.assert_close(b_r @ a_r, ideal_r, rtol=0, atol=1e-12 * scale**2 * s)
        base = lowrank.merge_into_base_(w0.clone(), b_r, a_r)
    effective = base + s * b_bar @ a_bar
    err = (effective - clients).norm() / clients.norm()
    assert err <= 1e-12


def _strategy(**kw):
    task = {"adapter": {"rank": R, "alpha": 8.0}, "adapter_seed": 0}
    return FedExLoRA(global_adapter(), task, max_num_examples=1000, **kw)


def _updates(strategy, nodes, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s.shape, generator=g) for k, s in strategy.up_specs(n).items()}
        for n in nodes
    ]


@pytest.mark.parametrize("ranks", [None, [2, 4, 3]])
def test_server_step_is_exact_in_float32(ranks):
    """The strategy's base module and global pair reproduce sum p_k (W0 + s_k B_k A_k) to 1e-6."""
    strategy = _strategy(train_head=True, ranks=ranks)
    nodes = [4, 2, 9]
    list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    updates = _updates(strategy, nodes, 3)
    weights = [30, 100, 7]
    strategy.aggregate_train(1, [reply(n, u, w) for n, u, w in zip(nodes, updates, weights)])
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    (module,) = strategy.base_stacks()
    for layer in range(LAYERS):
        name = f"enc.{layer}.q"
        ideal = sum(
            pk
            * (8.0 / R)  # per_rank: every client at s = alpha / adapter.rank
            * u[f"{name}.lora_B"].double()
            @ u[f"{name}.lora_A"].double()
            for pk, u in zip(p, updates)
        )
        g = strategy.global_adapter
        got = module[f"{name}.lora_B"].double() @ module[f"{name}.lora_A"].double()
        got += strategy.scale * g[f"{name}.lora_B"].double() @ g[f"{name}.lora_A"].double()
        assert (got - ideal).norm() / ideal.norm() < 1e-6
    head = sum(pk * u["head.classifier.bias"].double() for pk, u in zip(p, updates))
    torch.testing.assert_close(strategy.global_adapter["head.classifier.bias"].double(), head)


def test_bytes_match_the_communication_table():
    strategy = _strategy(train_head=False, fraction=0.5, seed=1)
    nodes = [1, 2, 3, 4, 5, 6]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    per_layer = R * (D_IN + D_OUT)
    assert strategy.stats.bytes_down == len(messages) * LAYERS * per_layer * 4
    sampled = [m.metadata.dst_node_id for m in messages]
    k = len(sampled)
    strategy.aggregate_train(
        1, [reply(n, u, 5 + n) for n, u in zip(sampled, _updates(strategy, sampled, 1))]
    )
    assert strategy.stats.bytes_up == k * LAYERS * per_layer * 4
    again = list(strategy.configure_train(2, None, {}, FakeGrid(nodes)))
    residual = (k - 1) * R * (D_IN + D_OUT)  # to every client, sampled in round 1 or not
    assert strategy.stats.bytes_down == len(again) * LAYERS * (per_layer + residual) * 4
    one = _strategy(train_head=False)
    list(one.configure_train(1, None, {}, FakeGrid([1])))
    one.aggregate_train(1, [reply(1, _updates(one, [1], 2)[0], 5)])
    assert one.base_stacks() == []  # K = 1: R = 0, no module


def _bases(runtime):
    return {k: v.detach().clone() for k, v in adapters.base_weights(runtime.model).items()}


def test_skipped_and_restarted_clients_end_with_the_same_base(data_dir):
    """Node 2 misses round 2, node 3 restarts before round 3: all end bitwise with node 1's base."""
    cfg = compose_config(
        [
            *FAST_RUN,
            "strategy=fedex_lora",
            "federation.num_clients=3",
            "train.batch_size=4",
            "federation.local_steps=1",
        ]
    )
    fed = prepare(cfg)
    strategy, evaluator = fed.strategy, fed.evaluator
    nodes = {1: 0, 2: 1, 3: 2}

    def context(n):
        return Context(1, n, {"partition-id": nodes[n], "num-partitions": 3}, RecordDict(), {})

    contexts = {n: context(n) for n in nodes}
    schedule = {1: [1, 2, 3], 2: [1, 3], 3: [1, 2, 3], 4: [1, 2, 3]}
    bases = {}
    for server_round, sampled in schedule.items():
        if server_round == 3:
            contexts[3] = context(3)
        messages = strategy.configure_train(
            server_round, ArrayRecord(), ConfigRecord(), FakeGrid(sampled)
        )
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                replies.append(train(msg, contexts[node]))
            except StateMismatch as exc:
                assert server_round == 3 and node == 3 and "base version" in str(exc)
                replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
                continue
            if server_round == 4:
                bases[node] = _bases(model_runtime(json.loads(str(msg.content["config"]["task"]))))
        strategy.aggregate_train(server_round, replies)
    assert len(strategy.stacks) == 4 and strategy.roster.versions == {1: 3, 2: 3, 3: 3}
    evaluator(strategy.global_adapter)
    server = _bases(evaluator.runtime)
    pristine = evaluator.runtime.pristine
    for key, value in bases[1].items():
        assert not torch.equal(value, pristine[key])
        assert torch.equal(bases[2][key], value) and torch.equal(bases[3][key], value)
    merged = {k: v.clone() for k, v in pristine.items()}
    for module in strategy.stacks:
        for key in merged:
            lowrank.merge_into_base_(merged[key], module[f"{key}.lora_B"], module[f"{key}.lora_A"])
    for key in merged:
        torch.testing.assert_close(server[key], merged[key], atol=1e-6, rtol=0)


def test_simulation_and_saved_adapter(tmp_path, data_dir):
    run = [*FAST_RUN, "strategy=fedex_lora", f"run_dir={tmp_path}"]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2
    layers, hidden, head, r = 4, 64, 2 * 64 + 2, 8
    pair = layers * r * 2 * hidden + head
    assert summary["bytes_up"] == 2 * 2 * pair * 4
    residual = layers * (2 - 1) * r * 2 * hidden  # round 2: round 1's residual, K = 2
    assert summary["bytes_down"] == (2 * pair + 2 * (pair + residual)) * 4
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)


def test_a_quantised_base_is_refused():
    """The residual is merged into the base weights, which a 4-bit base cannot take exactly."""
    pytest.importorskip("bitsandbytes")
    from fedpeft.errors import ConfigError
    from tests.causal.test_precision import GSM8K

    with pytest.raises(ConfigError, match=r"strategy=fedex_lora on a 4bit base: it merges"):
        compose_config([*GSM8K, "device=cpu", "model.quantization=4bit", "strategy=fedex_lora"])
