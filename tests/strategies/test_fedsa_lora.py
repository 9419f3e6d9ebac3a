"""FedSA-LoRA (docs/algorithms.md §11): A shared and averaged, B_k and head_k kept by each
client."""

import csv
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedpeft import adapters, protocol, training
from fedpeft.cli import simulate
from fedpeft.clients import local_factors
from fedpeft.clients.client_app import evaluate, evaluate_round, train, train_round
from fedpeft.clients.client_data import client_examples
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.privacy import DPSettings, NodePolicy, PolicyViolation
from fedpeft.records import from_record
from fedpeft.runtime import model_runtime
from fedpeft.strategies import FedSALoRA
from fedpeft.strategies import fedsa_lora as fedsa_module
from fedpeft.training import TrainSettings
from tests.conftest import FAST_RUN
from tests.strategies.conftest import (
    D_IN,
    LAYERS,
    FakeGrid,
    R,
    global_adapter,
    reference_average,
    reply,
)

RUN = [*FAST_RUN, "strategy=fedsa_lora", "train.batch_size=4", "federation.local_steps=2"]


def _strategy(**kw) -> FedSALoRA:
    return FedSALoRA(global_adapter(), {"adapter": {"rank": R}}, max_num_examples=1000, **kw)


def _a_updates(strategy, k, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {key: torch.randn(s.shape, generator=g) for key, s in strategy.up_specs(0).items()}
        for _ in range(k)
    ]


def test_round_config_names_are_the_protocols_on_both_sides():
    """The strategy cannot import the client side: both take the entries from protocol.py."""
    assert fedsa_module.LOCAL_FACTORS is protocol.LOCAL_FACTORS is local_factors.LOCAL_FACTORS
    assert fedsa_module.HOLDOUT_FRACTION is protocol.HOLDOUT_FRACTION
    assert local_factors.HOLDOUT_FRACTION is protocol.HOLDOUT_FRACTION


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 5), seed=st.integers(0, 2**16), head=st.booleans())
def test_a_bar_is_the_weighted_average_of_the_clients_a(k, seed, head):
    """(b) A_bar = sum p_k A_k against a float64 reference; the server holds nothing else."""
    strategy = _strategy(train_head=head)
    nodes = list(range(1, k + 1))
    list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    updates = _a_updates(strategy, k, seed)
    weights = [
        int(w) for w in torch.randint(1, 500, (k,), generator=torch.Generator().manual_seed(seed))
    ]
    strategy.aggregate_train(1, [reply(n, u, w) for n, u, w in zip(nodes, updates, weights)])
    ideal = reference_average(updates, weights)
    assert set(strategy.global_adapter) == set(ideal)
    assert all(k.endswith(".lora_A") for k in strategy.global_adapter)
    for key, value in ideal.items():
        torch.testing.assert_close(strategy.global_adapter[key].double(), value, atol=1e-6, rtol=0)


def test_replies_with_b_or_head_are_rejected_and_bytes_match_the_table():
    """(a) the reply spec is A only; bytes are r d_in per layer each way (Part II table)."""
    strategy = _strategy(train_head=True, fraction=0.5, seed=1)
    nodes = [1, 2, 3, 4, 5, 6]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    per_client = LAYERS * R * D_IN * 4
    assert strategy.stats.bytes_down == len(messages) * per_client
    for msg in messages:
        assert all(k.endswith(".lora_A") for k in msg.content["arrays"])
        assert msg.content["config"]["local-factors"] == "lora_B,head"
    sampled = [m.metadata.dst_node_id for m in messages]
    updates = _a_updates(strategy, len(sampled), 2)
    full = global_adapter()
    updates[0]["enc.0.q.lora_B"] = full["enc.0.q.lora_B"]
    updates[1]["head.classifier.bias"] = full["head.classifier.bias"]
    strategy.aggregate_train(1, [reply(n, u, 10) for n, u in zip(sampled, updates)])
    assert set(strategy.stats.rejected) == set(sampled[:2])
    assert all("unexpected" in r for r in strategy.stats.rejected.values())
    assert strategy.stats.bytes_up == (len(sampled) - 2) * per_client
    assert _strategy(train_head=False).node_payload(1)[1]["local-factors"] == "lora_B"


def test_no_personalised_evaluation_is_asked_in_a_private_run_and_bad_options_are_refused():
    private = FedSALoRA(
        global_adapter(), {"dp": {"enabled": True}}, max_num_examples=1000, train_head=False
    )
    assert list(private.configure_evaluate(1, None, {}, FakeGrid([1, 2]))) == []
    assert "holdout-fraction" not in private.node_payload(1)[1]  # nothing held out under DP
    strategy = _strategy()
    asked = list(strategy.configure_evaluate(0, None, {}, FakeGrid([1, 2])))
    assert [m.metadata.message_type for m in asked] == ["evaluate", "evaluate"]
    # After round 0 only nodes with a personal model (that have replied) score it.
    assert list(strategy.configure_evaluate(1, None, {}, FakeGrid([1, 2]))) == []
    strategy.stats.accepted.append(2)
    asked = list(strategy.configure_evaluate(1, None, {}, FakeGrid([1, 2])))
    assert [m.metadata.dst_node_id for m in asked] == [2]
    # A pooled population (node ids are client ids 0..N-1) is never listed: only the clients
    # the round trained score (none in round 0).
    pooled = _strategy()
    pooled.roster.population = 10**9
    population = SimpleNamespace(get_node_ids=lambda: range(10**9))
    assert list(pooled.configure_evaluate(0, None, {}, population)) == []
    pooled.stats.accepted.extend([123_456_789, 5])
    asked = list(pooled.configure_evaluate(1, None, {}, population))
    assert [m.metadata.dst_node_id for m in asked] == [5, 123_456_789]
    pooled.stats = type(pooled.stats)()
    pooled.stats.accepted.append(7)
    asked = list(pooled.configure_evaluate(2, None, {}, population))
    assert [m.metadata.dst_node_id for m in asked] == [7]  # not everyone trained so far
    with pytest.raises(ValueError, match="holdout_fraction=0.7 must be in"):
        _strategy(holdout_fraction=0.7)
    with pytest.raises(ValueError, match="task=classification only"):
        FedSALoRA(global_adapter(), {"task": "causal_lm"}, max_num_examples=1000)


def _state(context) -> dict[str, torch.Tensor]:
    return from_record(context.state.array_records[local_factors.STATE_KEY])


def _context(node, partitions, state_dir):
    config = {"partition-id": node - 1, "num-partitions": partitions, "state-dir": str(state_dir)}
    return Context(1, node, config, RecordDict(), {})


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, data_dir):
    """Three rounds of 3 real tiny_bert clients: node 2 skips round 2, node 3 restarts before 3."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as conftest's
    state_dir = tmp_path_factory.mktemp("node_state")
    fed = prepare(compose_config([*RUN, "federation.num_clients=3"]))
    strategy = fed.strategy
    contexts = {n: _context(n, 3, state_dir) for n in (1, 2, 3)}
    out = {"loaded": {}, "after": {}, "held": {}, "replies": [], "sent": [], "fed": fed}
    real_held = local_factors.held
    current = {}

    def spy(state, store):
        tensors = real_held(state, store)
        out["loaded"][current["round"], store.member + 1] = {
            k: v.clone() for k, v in tensors.items()
        }
        return tensors

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local_factors, "held", spy)
        for server_round, sampled in {1: [1, 2, 3], 2: [1, 3], 3: [1, 2, 3]}.items():
            current["round"] = server_round
            if server_round == 3:
                contexts[3] = _context(3, 3, state_dir)  # a restart: Context.state is gone
            messages = list(
                strategy.configure_train(
                    server_round, ArrayRecord(), ConfigRecord(), FakeGrid(sampled)
                )
            )
            out["sent"] += [dict(m.content["arrays"]) for m in messages]
            replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
            out["replies"].append(
                [
                    (from_record(r.content["arrays"]), r.content["metrics"]["num-examples"])
                    for r in replies
                ]
            )
            held = {n: _state(contexts[n]) for n in sampled}
            strategy.aggregate_train(server_round, replies)
            out["held"][server_round] = held
            out["after"][server_round] = {n: _state(contexts[n]) for n in sampled}
    out["contexts"], out["state_dir"] = contexts, state_dir
    return out


def test_uploads_carry_a_only_and_the_server_step_leaves_every_b_untouched(rounds):
    """(a) message audit of real replies; (b) A_bar from them in float64; (c) B_k untouched."""
    strategy = rounds["fed"].strategy
    for payload in rounds["sent"]:
        assert payload and all(k.endswith(".lora_A") for k in payload)
    for tensors, _ in sum(rounds["replies"], []):
        assert tensors and all(k.endswith(".lora_A") for k in tensors)
    last = rounds["replies"][-1]
    ideal = reference_average([t for t, _ in last], [n for _, n in last])
    for key, value in ideal.items():
        torch.testing.assert_close(strategy.global_adapter[key].double(), value, atol=1e-6, rtol=0)
    for server_round, held in rounds["held"].items():
        for node, tensors in held.items():
            after = rounds["after"][server_round][node]
            assert set(tensors) == set(after) and all(
                torch.equal(tensors[k], after[k]) for k in after
            )
            assert any(k.endswith(".lora_B") for k in tensors)
            assert any(k.startswith("head.") for k in tensors)
            assert all(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith(".lora_B"))


def test_a_skipped_and_a_restarted_client_resume_their_own_b(rounds):
    """(d) node 2 (not sampled in round 2) and node 3 (restarted) start round 3 from their own."""
    loaded, held = rounds["loaded"], rounds["held"]
    assert loaded[1, 1] == {} and loaded[1, 2] == {}  # round 1: peft init (B = 0) and seeded head
    for node, since in ((2, 1), (3, 2), (1, 2)):
        start, kept = loaded[3, node], held[since][node]
        assert set(start) == set(kept) and all(torch.equal(start[k], kept[k]) for k in kept)
    b = next(k for k in held[1][1] if k.endswith(".lora_B"))
    assert not torch.equal(held[1][1][b], held[1][2][b])  # personal: each node its own B


def test_evaluation_uses_the_nodes_own_b_and_head(rounds):
    """(e) each node scores (A_bar, B_k, head_k) on its held-out slice; a restart changes none."""
    fed, contexts = rounds["fed"], rounds["contexts"]
    strategy = fed.strategy
    messages = list(
        strategy.configure_evaluate(3, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3]))
    )
    replies = [evaluate(m, contexts[m.metadata.dst_node_id]) for m in messages]
    task = json.loads(str(messages[0].content["config"]["task"]))
    runtime = model_runtime(task)
    scores = {}
    for msg, rep in zip(messages, replies):
        node = msg.metadata.dst_node_id
        metrics = rep.content["metrics"]
        _, held_out = local_factors.split(
            client_examples(task, contexts[node].node_config),
            {"holdout-fraction": 0.2},
            0,
            node - 1,
        )
        runtime.reset(strategy.global_adapter)
        adapters.write_adapter(runtime.model, _state(contexts[node]))
        own = training.evaluate(
            runtime.model,
            held_out,
            batch_size=4,
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            num_labels=2,
        )
        assert metrics["num-examples"] == len(held_out) and metrics["client-id"] == node - 1
        assert metrics["accuracy"] == pytest.approx(own["accuracy"], abs=1e-9)
        assert metrics["loss"] == pytest.approx(own["loss"], abs=1e-6)
        scores[node - 1] = (len(held_out), metrics["accuracy"], metrics["loss"])
        restarted = _context(node, 3, rounds["state_dir"])
        again = evaluate(msg, restarted).content["metrics"]
        assert again["loss"] == metrics["loss"]
    record = strategy.aggregate_evaluate(3, replies)
    expected = fedsa_module.personalised_metrics(scores)
    assert record["accuracy"] == pytest.approx(expected["accuracy"])
    assert record["accuracy_min"] == min(a for _, a, _ in scores.values())
    n = sum(c for c, _, _ in scores.values())
    assert record["accuracy_weighted"] == pytest.approx(
        sum(c * a for c, a, _ in scores.values()) / n
    )
    # the node's privacy rule: a private task, or a node that requires DP, gets a refusal
    private = json.loads(str(messages[0].content["config"]["task"]))
    private["dp"] = dataclasses.asdict(DPSettings(enabled=True))  # every key: the node parses it
    config = ConfigRecord({**messages[0].content["config"], "task": json.dumps(private)})
    msg = Message(
        RecordDict({"arrays": messages[0].content["arrays"], "config": config}),
        dst_node_id=1,
        message_type="evaluate",
    )
    with pytest.raises(PolicyViolation, match="refuses to release personalised"):
        evaluate(msg, contexts[1])
    required = _context(1, 3, rounds["state_dir"])
    required.node_config.update({"dp-required": True, "dp-epsilon": 3})
    with pytest.raises(PolicyViolation, match="refuses to release personalised"):
        evaluate(messages[0], required)


def test_with_one_client_fedsa_is_local_training(tmp_path, data_dir):
    """(f) one client: A_bar = A_1 each round, so two FedSA rounds equal two local rounds."""
    fed = prepare(compose_config([*RUN, "federation.num_clients=1"]))
    strategy, context = fed.strategy, _context(1, 1, tmp_path)
    for server_round in (1, 2):
        (msg,) = strategy.configure_train(
            server_round, ArrayRecord(), ConfigRecord(), FakeGrid([1])
        )
        torch.manual_seed(100 + server_round)
        strategy.aggregate_train(server_round, [train(msg, context)])
    task = json.loads(str(msg.content["config"]["task"]))
    runtime = model_runtime(task)
    examples, _ = local_factors.split(
        client_examples(task, context.node_config), {"holdout-fraction": 0.2}, 0, 0
    )
    runtime.reset({})
    hp = TrainSettings.parse(task["train"])
    for server_round in (1, 2):
        torch.manual_seed(100 + server_round)
        optimizer, steps = training.local_round(runtime.model, hp, len(examples))
        training.train_steps(
            runtime.model,
            examples,
            optimizer,
            steps=steps,
            batch_size=hp.batch_size,
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            seed=training.sampler_seed(int(task["seed"]), server_round, 0),
            max_grad_norm=hp.max_grad_norm,
        )
    local = adapters.read_adapter(runtime.model, adapters.adapter_tensors(runtime.model))
    federated = {**strategy.global_adapter, **_state(context)}
    assert set(federated) == set(local)
    for key, value in local.items():
        torch.testing.assert_close(federated[key], value, atol=1e-6, rtol=0)


def test_a_private_round_trains_b_under_dp_and_keeps_it(tmp_path, data_dir):
    """DP: A and B trained by DP-SGD, B kept; the reply has A and data-independent metrics only."""
    cfg = compose_config([*RUN, "federation.num_clients=2", "dp=eps3", "adapter.train_head=false"])
    fed = prepare(cfg)
    policy = NodePolicy.for_simulation(cfg.dp, tmp_path)
    context = _context(1, 2, tmp_path)
    (msg, _) = fed.strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2]))
    assert msg.content["config"]["local-factors"] == "lora_B"  # the head frozen
    answer = train_round(msg, context, policy)
    assert all(k.endswith(".lora_A") for k in answer.content["arrays"])
    metrics = answer.content["metrics"]
    assert "train-loss" not in metrics and metrics["epsilon"] > 0
    kept = _state(context)
    assert kept and all(k.endswith(".lora_B") for k in kept)
    assert all(t.abs().sum() > 0 for t in kept.values())
    saved, server_round = local_factors.LocalFactorFile(tmp_path, 1, 0).load()
    assert server_round == 1 and all(torch.equal(saved[k], kept[k]) for k in kept)
    assert (
        list(fed.strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), FakeGrid([1]))) == []
    )
    assert evaluate_round_refused(msg, context, policy)


def evaluate_round_refused(train_msg, context, policy) -> bool:
    """Whether the node refuses an evaluate message in the run it spent budget in."""
    content = RecordDict(
        {"arrays": train_msg.content["arrays"], "config": train_msg.content["config"]}
    )
    msg = Message(content, dst_node_id=1, message_type="evaluate")
    try:
        evaluate_round(msg, context, policy)
    except PolicyViolation:
        return True
    return False


def test_simulation_reports_personalised_accuracy_and_saves_shared_a_only(tmp_path, data_dir):
    """2 rounds through real Flower: bytes r d_in per layer each way, personalised summary."""
    summary = simulate([*RUN, f"run_dir={tmp_path}"])
    assert summary["rounds_completed"] == 2 and summary["evaluation"] == "personalised"
    layers, hidden, r = 4, 64, 8
    assert summary["bytes_up"] == summary["bytes_down"] == 2 * 2 * layers * r * hidden * 4
    accuracy = summary["accuracy_by_round"]
    assert len(accuracy) == 3 and all(0 <= a <= 1 for a in accuracy)
    assert summary["final_accuracy_min"] <= summary["final_accuracy"] <= 1
    assert 0 <= summary["final_accuracy_weighted"] <= 1
    assert "not comparable" in summary["evaluation_note"]
    shared = load_file(str(tmp_path / "adapter" / "shared_lora_A.safetensors"))
    assert len(shared) == layers and all(k.endswith(".lora_A") for k in shared)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["shared_lora_A.safetensors"]
    files = sorted((tmp_path / "node_state").glob("run-*/client-*.local-factors.safetensors"))
    assert len(files) == 2
    for file in files:
        kept = load_file(str(file))
        assert kept and all(k.endswith(".lora_B") or k.startswith("head.") for k in kept)
    with (tmp_path / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["eval_clients"]) for r in rows] == [2, 2, 2]
    assert int(rows[1]["eval_bytes_down"]) == 2 * layers * r * hidden * 4


def test_a_private_run_reports_no_accuracy(data_dir):
    """The server asks nothing under DP: the row and the summary say so, compare shows "—"."""
    from types import SimpleNamespace

    from fedpeft.compare.aggregate import _accuracy_cell
    from fedpeft.server_app import evaluate_round as server_evaluate_round
    from fedpeft.server_app import personalised_summary

    private = FedSALoRA(global_adapter(), {"dp": {"enabled": True}}, max_num_examples=1000)
    fed = SimpleNamespace(strategy=private, cfg=None)
    metrics = server_evaluate_round(FakeGrid([1, 2]), fed, 1)
    assert metrics == {"accuracy": None, "loss": None}
    extra = personalised_summary(private, [{"round": 1, **metrics}])
    assert (
        extra["final_accuracy_min"] is None and "not released under DP" in extra["evaluation_note"]
    )
    runs = [{"final_accuracy": None, "evaluation": "personalised"}]
    assert _accuracy_cell(runs, "final_accuracy") == "— (personalised)"
    assert _accuracy_cell([{"final_accuracy": 0.5}], "final_accuracy") == "0.5000"


def test_resume_is_refused(tmp_path):
    """Client factors are keyed by the Flower run, which a resumed run does not keep."""
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="resume= with strategy=fedsa_lora"):
        compose_config([*RUN, f"resume={tmp_path}"])
