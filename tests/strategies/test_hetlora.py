"""HetLoRA (docs/algorithms.md §10): trace norms, pad/truncate, sparsity weights, FedIT, rank table,
bytes, and a private run whose saved adapter reloads in plain peft."""

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft import lowrank
from fedpeft.cli import main, simulate
from fedpeft.clients.rank_pruning import truncate
from fedpeft.strategies import FedAvgLoRA, HetLoRA
from fedpeft.strategies.ranks import RankPlan
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import (
    D_IN,
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    client_updates,
    global_adapter,
    reference_average,
)

HEAD = 2 * D_OUT + 2
TASK = {"adapter": {"rank": R, "alpha": 8.0}, "adapter_seed": 0}


@settings(max_examples=20, deadline=None)
@given(
    r=st.integers(1, 6),
    layers=st.integers(1, 3),
    shape=st.sampled_from([(5, 9), (16, 16), (24, 7)]),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_trace_formula_is_the_dense_frobenius_norm(r, layers, shape, scale, seed):
    """(a) sqrt(tr((B^T B)(A A^T))) = ||B A||_F against the float64 dense product."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(layers, r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(layers, d_out, r, generator=g, dtype=torch.float64)
    b[..., -1] = 0  # a zero column (a padded or pruned tail) changes nothing
    dense = np.array([np.linalg.norm((b[i] @ a[i]).numpy()) for i in range(layers)])
    got = lowrank.lora_product_norms(a, b).numpy()
    np.testing.assert_allclose(got, dense, rtol=1e-12, atol=0)
    single = lowrank.lora_product_norms(a.float(), b.float()).numpy()
    np.testing.assert_allclose(single, dense, rtol=1e-5, atol=0)


@settings(max_examples=20, deadline=None)
@given(
    ranks=st.lists(st.integers(1, R), min_size=1, max_size=4),
    alpha=st.floats(0.5, 64.0),
    seed=st.integers(0, 2**16),
)
def test_pad_then_truncate_is_the_identity(ranks, alpha, seed):
    """(b) A reply padded to r_max and truncated back to its rank is bitwise the reply."""
    plan = RankPlan.build(ranks, R, alpha, "per_rank", padded=True)
    g = torch.Generator().manual_seed(seed)
    for r in ranks:
        reply = {
            "l.lora_A": torch.randn(r, D_IN, generator=g),
            "l.lora_B": torch.randn(D_OUT, r, generator=g),
            "head.w": torch.randn(3, generator=g),
        }
        padded = plan.pad(reply)
        assert padded["l.lora_A"].shape == (R, D_IN) and padded["l.lora_B"].shape == (D_OUT, R)
        for back in (plan.truncate(padded, r), truncate(padded, r)):  # server and client
            assert all(torch.equal(back[k], reply[k]) for k in reply)


@settings(max_examples=30, deadline=None)
@given(
    norms=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_sparsity_weights_sum_to_one(norms, seed):
    """(c) w_k = S_k / sum S_j sums to 1; all S_k = 0 gives the p_k."""
    g = torch.Generator().manual_seed(seed)
    p = lowrank.normalize_weights(torch.randint(1, 100, (len(norms),), generator=g))
    w = lowrank.sparsity_weights(torch.tensor(norms, dtype=torch.float64), p)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    if sum(norms) == 0:
        assert torch.equal(w, p)
    else:
        expected = np.asarray(norms) / np.sum(norms)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-14, atol=1e-300)


def _strategy(**kw):
    kw.setdefault("min_rank", 1)
    return HetLoRA(global_adapter(), TASK, max_num_examples=1000, **kw)


def test_equal_ranks_with_w_p_is_bitwise_fedit():
    """(d) The aggregation given w = p, all clients at r_max: bitwise FedIT; head p-averaged."""
    keys = [f"enc.{i}.q.lora_{f}" for i in range(LAYERS) for f in "AB"]
    updates = client_updates(keys, 4, seed=2)
    p = lowrank.normalize_weights([5, 17, 3, 11])
    het = _strategy(train_head=False)
    fedit = FedAvgLoRA(global_adapter(), TASK, max_num_examples=1000, train_head=False)
    het.combine([het.plan.pad(u) for u in updates], p, p)
    fedit.aggregate_updates(updates, p)
    for key in keys:
        assert torch.equal(het.global_adapter[key], fedit.global_adapter[key]), key
    heads = ["head.classifier.weight", "head.classifier.bias"]
    with_head = client_updates(keys + heads, 4, seed=3)
    het = _strategy(train_head=True)
    w = lowrank.normalize_weights([1, 2, 3, 4])
    het.combine(with_head, w, p)
    for key, value in reference_average(with_head, [5, 17, 3, 11]).items():
        if key in heads:
            torch.testing.assert_close(het.global_adapter[key], value.float())


def _reply(node, tensors, num_examples, rank=None):
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
    metrics = {"num-examples": num_examples, "train-loss": 0.5}
    if rank is not None:
        metrics["adapter-rank"] = rank
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=sent)


def _factors(rank, g, head=True):
    out = {}
    for i in range(LAYERS):
        out[f"enc.{i}.q.lora_A"] = torch.randn(rank, D_IN, generator=g)
        out[f"enc.{i}.q.lora_B"] = torch.randn(D_OUT, rank, generator=g)
    if head:
        out["head.classifier.weight"] = torch.randn(2, D_OUT, generator=g)
        out["head.classifier.bias"] = torch.randn(2, generator=g)
    return out


def _sent_rank(msg):
    arrays = msg.content.array_records["arrays"]
    rank = msg.content.config_records["config"]["adapter-rank"]
    assert all(arrays[f"enc.{i}.q.lora_A"].shape == (rank, D_IN) for i in range(LAYERS))
    assert all(arrays[f"enc.{i}.q.lora_B"].shape == (D_OUT, rank) for i in range(LAYERS))
    return rank


def test_rank_table_follows_client_reports_and_bytes_match_the_table(tmp_path):
    """(f) Reports shrink the table; growing, too small, non-integer or mis-shaped ones are
    rejected and change nothing; bytes are r_k'(d_in + d_out) up and r_k(d_in + d_out) down."""
    strategy = _strategy(ranks=[4, 3, 2], min_rank=2, train_head=True, prune_gamma=0.5)
    nodes = [1, 2, 3]
    sent = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    assert [_sent_rank(m) for m in sent] == [4, 3, 2]
    config = sent[0].content.config_records["config"]
    assert (config["rank-min"], config["rank-prune-gamma"], config["rank-prune-lambda"]) == (
        2,
        0.5,
        1e-3,
    )
    assert config["adapter-alpha"] == 8.0  # alpha_k = s r_k, s = 8 / 4
    assert strategy.stats.bytes_down == (9 * (D_IN + D_OUT) * LAYERS + 3 * HEAD) * 4
    # A sends the truncation of the global: B_g[:, :r], A_g[:r]
    third = sent[2].content.array_records["arrays"]
    a_g = strategy.global_adapter["enc.0.q.lora_A"]
    assert np.array_equal(third["enc.0.q.lora_A"].numpy(), a_g[:2].numpy())
    g = torch.Generator().manual_seed(0)
    replies = [
        _reply(1, _factors(2, g), 10, rank=2),  # pruned 4 -> 2
        _reply(2, _factors(3, g), 20, rank=3),  # kept its rank
        _reply(3, _factors(2, g), 30),  # no report: read at the rank it was sent
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.stats.rejected == {} and strategy.stats.replied == 3
    assert strategy.stats.bytes_up == (7 * (D_IN + D_OUT) * LAYERS + 3 * HEAD) * 4
    assert strategy.current == {1: 2, 2: 3}
    assert float(strategy.sparsity.sum()) == pytest.approx(1.0, abs=1e-14)

    sent = list(strategy.configure_train(2, None, {}, FakeGrid(nodes)))
    assert [_sent_rank(m) for m in sent] == [2, 3, 2]
    assert strategy.stats.bytes_down == (7 * (D_IN + D_OUT) * LAYERS + 3 * HEAD) * 4
    before = {k: v.clone() for k, v in strategy.global_adapter.items()}
    bad = [
        _reply(1, _factors(3, g), 10, rank=3),  # grows past the 2 it holds
        _reply(2, _factors(1, g), 20, rank=1),  # below rank-min
        _reply(3, _factors(1, g), 30, rank=2),  # shapes of rank 1, reports 2
    ]
    strategy.aggregate_train(2, bad)
    assert set(strategy.stats.rejected) == {1, 2, 3} and strategy.stats.replied == 0
    assert "outside [2, 2]" in strategy.stats.rejected[1]
    assert "outside [2, 3]" in strategy.stats.rejected[2]
    assert "rank 1, expected rank 2" in strategy.stats.rejected[3]
    assert strategy.current == {1: 2, 2: 3}
    assert all(torch.equal(before[k], v) for k, v in strategy.global_adapter.items())
    strategy.aggregate_train(2, [_reply(2, _factors(3, g), 20, rank=2.5)])
    assert "not an integer rank" in strategy.stats.rejected[2]

    tensors, meta = strategy.state_dict()
    resumed = _strategy(ranks=[4, 3, 2], min_rank=2, train_head=True, prune_gamma=0.5)
    resumed.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert resumed.current == strategy.current
    assert [resumed.rank_of(n) for n in nodes] == [2, 3, 2]


def test_sparsity_weights_are_the_whole_update_norms():
    """S_k^2 is the sum over layers of ||B_kl A_kl||_F^2 (dense float64 reference)."""
    strategy = _strategy(ranks=[4, 2], train_head=False)
    list(strategy.configure_train(1, None, {}, FakeGrid([1, 2])))
    g = torch.Generator().manual_seed(5)
    ups = [_factors(4, g, head=False), _factors(2, g, head=False)]
    strategy.aggregate_train(1, [_reply(1, ups[0], 3, rank=4), _reply(2, ups[1], 9, rank=2)])
    dense = [
        np.sqrt(
            sum(
                np.linalg.norm(u[f"enc.{i}.q.lora_B"].double() @ u[f"enc.{i}.q.lora_A"].double())
                ** 2
                for i in range(LAYERS)
            )
        )
        for u in ups
    ]
    np.testing.assert_allclose(strategy.sparsity.numpy(), np.array(dense) / sum(dense), rtol=1e-6)
    w = strategy.sparsity.numpy()
    for i in range(LAYERS):
        key = f"enc.{i}.q.lora_B"
        padded = np.pad(ups[1][key].double().numpy(), ((0, 0), (0, 2)))
        expected = w[0] * ups[0][key].double().numpy() + w[1] * padded
        np.testing.assert_allclose(strategy.global_adapter[key].numpy(), expected, atol=1e-5)


def test_min_rank_is_required_and_checked():
    with pytest.raises(ValueError, match="strategy.params.min_rank is required"):
        HetLoRA(global_adapter(), TASK, ranks=[2, 4])
    with pytest.raises(ValueError, match="exceeds the smallest client rank 2"):
        HetLoRA(global_adapter(), TASK, ranks=[2, 4], min_rank=3)
    with pytest.raises(ValueError, match="prune_gamma=1.0 must be in"):
        HetLoRA(global_adapter(), TASK, ranks=[2, 4], min_rank=1, prune_gamma=1.0)
    with pytest.raises(ValueError, match="above adapter.rank"):
        HetLoRA(global_adapter(), TASK, ranks=[2, 8], min_rank=1)


def test_simulation_prunes_and_its_adapter_reloads_in_plain_peft(tmp_path, data_dir):
    """Mixed ranks through real Flower with pruning on; the r_max adapter reloads in peft.

    DP is covered at the client (tests/clients/test_rank_pruning.py): under DP-SGD's noise a
    2-round run would prune or not by chance.
    """
    run = [
        *FAST_RUN,
        "strategy=hetlora",
        "strategy.params.ranks=[4,8]",
        "strategy.params.min_rank=2",
        "strategy.params.prune_lambda=10",
        f"run_dir={tmp_path}",
    ]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    table = dict(state["strategy"]["hetlora_ranks"])
    assigned = dict(state["strategy"]["node_ranks"])
    assert sorted(assigned.values()) == [4, 8] and set(table) == set(assigned)
    assert all(2 <= table[m] <= assigned[m] for m in table)
    assert any(table[m] < assigned[m] for m in table)  # the tail penalty made a client prune
    layers, hidden, head = 4, 64, 2 * 64 + 2
    with (tmp_path / "history.csv").open() as f:
        last = next(row for row in csv.DictReader(f) if row["round"] == "2")
    # round 1 cannot prune (the received tail is B = 0): round 2 is sent the assigned ranks,
    # and its replies have the ranks now in the table
    assert int(last["bytes_down"]) == (layers * 12 * 2 * hidden + 2 * head) * 4
    assert int(last["bytes_up"]) == (layers * sum(table.values()) * 2 * hidden + 2 * head) * 4
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16


def test_the_config_requires_min_rank(capsys):
    """strategy=hetlora without strategy.params.min_rank exits 2 with one line naming it."""
    assert main(["simulate", "strategy=hetlora"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategy.params.min_rank is required" in err
    assert main(["simulate", "strategy=hetlora", "strategy.params.min_rank=3"]) == 2
    assert "min_rank=3 exceeds the smallest client rank 2" in capsys.readouterr().err
    assert main(["simulate", "strategy=hetlora", "+strategy.params.scaling=shared"]) == 2
    assert "strategy.params.scaling is not an option of hetlora" in capsys.readouterr().err
