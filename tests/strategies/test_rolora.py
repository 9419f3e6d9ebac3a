"""RoLoRA (docs/algorithms.md §8): exact alternating averages, phase, bytes, stale clients, DP
run."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedpeft import adapters, lowrank, models, training
from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.clients.client_state import StateMismatch
from fedpeft.config import compose_config
from fedpeft.federation import build_task, prepare
from fedpeft.runtime import model_runtime
from fedpeft.strategies import RoLoRA
from fedpeft.strategies.rolora import changed_factors, phase
from tests.conftest import FAST_RUN, TINY, plain_peft_metrics
from tests.strategies.conftest import (
    D_IN,
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    global_adapter,
    reference_average,
    reply,
)


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 6),
    r=st.integers(1, 5),
    shape=st.sampled_from([(6, 9), (16, 16), (24, 10)]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_both_alternating_averages_are_exact_in_float64(k, r, shape, scale, seed):
    """(sum p_k B_k) A = sum p_k B_k A and B (sum p_k A_k) = sum p_k B A_k, as the server sums."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    a_k = scale * torch.randn(k, r, d_in, generator=g, dtype=torch.float64)
    b_k = scale * torch.randn(k, d_out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    p = lowrank.normalize_weights(torch.randint(1, 500, (k,), generator=g))
    for got, ideal in (
        (lowrank.weighted_average(b_k, p) @ a, sum(p[i] * b_k[i] @ a for i in range(k))),
        (b @ lowrank.weighted_average(a_k, p), sum(p[i] * b @ a_k[i] for i in range(k))),
    ):
        assert (got - ideal).norm() <= 1e-12 * ideal.norm()


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 10_000), history=st.lists(st.integers(1, 10_000), max_size=5))
def test_phase_is_a_pure_function_of_the_round(t, history):
    """B in odd rounds, A in even ones, whatever rounds a strategy (or client) saw before."""
    assert phase(t) == ("lora_B" if t % 2 else "lora_A") == phase(t)
    strategy = _strategy()
    for seen in history:
        strategy.round_instructions(seen)
        strategy.server_round = seen
    kind = strategy.round_instructions(t)["adapter"]["kind"]
    assert kind == ("frozen_a" if t % 2 else "frozen_b")
    assert adapters.KIND_FACTORS[kind] == (phase(t),)
    assert strategy.task["adapter"]["kind"] == "frozen_a"  # the run's task is not mutated
    assert changed_factors(t - 1, t) == [phase(t)]
    assert changed_factors(t - 1, t + 1) == ["lora_A", "lora_B"] == changed_factors(0, t + 1)
    with pytest.raises(ValueError, match="1-based"):
        phase(0)


def _strategy(**kw):
    task = {"adapter": {"kind": "frozen_a", "rank": R, "alpha": 8.0}, "adapter_seed": 0}
    return RoLoRA(global_adapter(), task, max_num_examples=1000, **kw)


def _round(strategy, server_round, nodes, seed, versions=True):
    """One round on a fake grid: random replies reporting the version they were sent."""
    messages = list(strategy.configure_train(server_round, None, {}, FakeGrid(nodes)))
    g = torch.Generator().manual_seed(seed)
    replies, updates, weights = [], [], []
    for msg in messages:
        node = msg.metadata.dst_node_id
        update = {k: torch.randn(s.shape, generator=g) for k, s in strategy.up_specs(node).items()}
        sent = reply(node, update, 3 + 7 * node)
        if versions:
            sent.content["metrics"]["frozen-version"] = server_round - 1
        replies.append(sent)
        updates.append(update)
        weights.append(3 + 7 * node)
    before = {k: v.clone() for k, v in strategy.global_adapter.items()}
    strategy.aggregate_train(server_round, replies)
    return messages, updates, weights, before


def test_server_step_averages_the_trained_factor_and_keeps_the_other_bitwise():
    strategy = _strategy(train_head=True)
    for server_round in range(1, 5):
        _, updates, weights, before = _round(strategy, server_round, [1, 2, 3], server_round)
        trained = phase(server_round)
        other = "lora_A" if trained == "lora_B" else "lora_B"
        ideal = reference_average(updates, weights)
        assert set(ideal) == set(strategy.factor_keys(trained) + strategy.head_keys())
        for key, value in ideal.items():
            torch.testing.assert_close(strategy.global_adapter[key].double(), value)
        for key in strategy.factor_keys(other):
            assert torch.equal(strategy.global_adapter[key], before[key]), key


def test_bytes_alternate_and_a_stale_client_gets_both_factors():
    """Up: r d_out (odd), r d_in (even); down: the factor of round t-1, both to a stale node."""
    strategy = _strategy(train_head=False)
    b_bytes, a_bytes = LAYERS * R * D_OUT * 4, LAYERS * R * D_IN * 4

    def payload(msg):
        return sorted(k.rsplit(".", 1)[1] for k in msg.content["arrays"])

    sent, *_ = _round(strategy, 1, [1, 2, 3], 1)  # round 1: the seeded init, nothing to send
    assert strategy.stats.bytes_down == 0 and strategy.stats.bytes_up == 3 * b_bytes
    assert all(not msg.content["arrays"] for msg in sent)
    sent, *_ = _round(strategy, 2, [1, 2], 2)  # node 3 misses round 2
    assert strategy.stats.bytes_down == 2 * b_bytes and strategy.stats.bytes_up == 2 * a_bytes
    assert all(payload(m) == ["lora_B"] * LAYERS for m in sent)
    sent, *_ = _round(strategy, 3, [1, 2, 3], 3)
    assert strategy.stats.bytes_up == 3 * b_bytes
    assert strategy.stats.bytes_down == 2 * a_bytes + (a_bytes + b_bytes)
    assert [payload(m) for m in sent] == [["lora_A"] * LAYERS] * 2 + [
        ["lora_A"] * LAYERS + ["lora_B"] * LAYERS
    ]
    config = sent[2].content["config"]
    assert (config["frozen-from"], config["frozen-version"]) == (0, 2)
    sent, *_ = _round(strategy, 4, [1, 2, 3], 4, versions=False)  # replies without a version
    assert strategy.stats.bytes_up == 3 * a_bytes and strategy.stats.bytes_down == 3 * b_bytes
    list(strategy.configure_train(5, None, {}, FakeGrid([1])))
    assert strategy.stats.bytes_down == a_bytes + b_bytes  # unknown version: both


def test_a_gradient_is_exactly_zero_while_b_is_zero():
    """Why round 1 trains B: with B = 0 (the init) an A-round cannot move the adapter."""
    base = models.load_model(models.ModelSpec.from_config(TINY, 2), seed=0)
    model = adapters.inject(base, adapters.AdapterSpec("frozen_b", 4, 8.0, ("query", "value")))
    adapters.write_adapter(model, adapters.initial_adapter(model, 3))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n or "modules_to_save" in n for n in trained)
    ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    grads = [
        adapters.factor_weight(layer, "lora_A").grad
        for layer in adapters.lora_layers(model).values()
    ]
    assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)
    head = [p.grad for p in adapters.head_parameters(model).values()]
    assert any(float(g.abs().sum()) > 0 for g in head)


def test_clients_train_from_the_servers_pair_after_missed_rounds_and_restarts(
    data_dir, monkeypatch
):
    """Node 3 misses round 2, node 2 restarts before round 3: in every round every client starts
    training from bitwise the server's global (A, B), and replies with the round's factor only."""
    cfg = compose_config(
        [*FAST_RUN, "strategy=rolora", "federation.num_clients=3", "federation.local_steps=1"]
    )
    strategy = prepare(cfg).strategy
    starts, trains = [], []
    original = training.train_steps

    def recording(model, *args, **kwargs):
        live = adapters.adapter_tensors(model)
        starts.append({k: v.detach().clone() for k, v in live.items() if ".lora_" in k})
        trains.append({k.rsplit(".", 1)[1] for k, v in live.items() if v.requires_grad})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "train_steps", recording)

    def context(n):
        return Context(1, n, {"partition-id": n - 1, "num-partitions": 3}, RecordDict(), {})

    contexts = {n: context(n) for n in (1, 2, 3)}
    schedule = {1: [1, 2, 3], 2: [1, 2], 3: [1, 2, 3], 4: [1, 2, 3]}
    for server_round, sampled in schedule.items():
        if server_round == 3:
            contexts[2] = context(2)
        start = {k: v.clone() for k, v in strategy.global_adapter.items()}
        messages = strategy.configure_train(
            server_round, ArrayRecord(), ConfigRecord(), FakeGrid(sampled)
        )
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                answer = train(msg, contexts[node])
            except StateMismatch as exc:
                assert (server_round, node) == (3, 2) and "frozen-version" in str(exc)
                replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
                continue
            held = starts.pop()
            assert held.keys() == set(strategy.factor_keys("lora_A", "lora_B"))
            for key, value in held.items():
                assert torch.equal(value, start[key]), (server_round, node, key)
            sent = {k.rsplit(".", 1)[1] for k in answer.content["arrays"] if ".lora_" in k}
            assert sent == {phase(server_round)} == trains.pop() - {"weight", "bias"}
            replies.append(answer)
        strategy.aggregate_train(server_round, replies)
        assert strategy.stats.replied == len(sampled) - (server_round == 3)
    assert strategy.roster.versions == {1: 3, 2: 3, 3: 3}
    moved = [not torch.equal(strategy.global_adapter[k], start[k]) for k in held]
    assert moved == [k.endswith("lora_A") for k in held]  # round 4 moved A, kept B


def test_private_simulation_and_saved_adapter(tmp_path, data_dir):
    """Two private rounds through Flower: B then A trained under DP-SGD, the ledger carried from
    round 1 to 2 (epsilon ends at its target), and the saved adapter reloads in plain peft."""
    run = [
        *FAST_RUN,
        "strategy=rolora",
        "dp=eps3",
        "adapter.train_head=false",
        f"run_dir={tmp_path}",
    ]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2 and 2.9 <= summary["max_epsilon"] <= 3.0
    factor = 4 * 8 * 64  # query+value in 2 layers, r = 8, d_in = d_out = 64; head frozen
    assert summary["bytes_up"] == 2 * 2 * factor * 4
    assert summary["bytes_down"] == 2 * factor * 4  # round 2: round 1's B
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    initial = model_runtime(build_task(compose_config(run), 2)).initial
    a_keys = [k for k in saved if "lora_A" in k]
    assert len(a_keys) == 4 and all(float(saved[k].abs().sum()) > 0 for k in saved if "lora_B" in k)
    moved = [
        not torch.equal(
            saved[k], initial[k.removeprefix("base_model.model.").replace(".weight", "")]
        )
        for k in a_keys
    ]
    assert all(moved)
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
