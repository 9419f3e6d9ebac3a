"""Drift correction in the strategy base: SCAFFOLD's server side, bytes, the refusal matrix."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import prepare
from fedpeft.strategies import STRATEGIES, FedAvgLoRA, FedSVD, FFALoRA, FlexLoRA, FLoRA
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import (
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    client_updates,
    global_adapter,
    reply,
)

#: method -> (server_opt, scaffold) with default strategy.params: True composes, False refuses.
MATRIX = {
    "fedavg": (True, True),
    "ffa_lora": (True, True),
    "lora_fair": (True, True),
    "fed_sb": (True, True),
    "fedex_lora": (False, True),
    "fedsvd": (False, False),
    "flora": (False, False),
    "flexlora": (False, False),
}
SGD = ["train.optimizer=sgd", "train.momentum=0"]


@pytest.mark.parametrize("method", sorted(MATRIX))
def test_the_composability_matrix_through_config_validation(method):
    """Every method x {fedprox, scaffold, server optimiser}: composes, or a one-line refusal."""
    compose_config([f"strategy={method}", "client_opt.proximal_mu=0.1"])  # FedProx: everywhere
    server_ok, scaffold_ok = MATRIX[method]
    for overrides, ok, field in (
        (["server_opt.name=fedadam"], server_ok, "server_opt.name=fedadam"),
        (["client_opt.scaffold=true", *SGD], scaffold_ok, "client_opt.scaffold=true"),
    ):
        if ok:
            compose_config([f"strategy={method}", *overrides])
        else:
            with pytest.raises(ConfigError, match=f"{field} with strategy={method}: "):
                compose_config([f"strategy={method}", *overrides])
    assert set(MATRIX) <= set(STRATEGIES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["client_opt.proximal_mu=-0.1"], "client_opt.proximal_mu=-0.1 must be"),
        (["client_opt.scaffold=yes"], "client_opt.scaffold=yes must be true or false"),
        (["client_opt.scaffold=true"], "needs|train.optimizer=sgd"),
        (["client_opt.scaffold=true", "train.optimizer=sgd", "train.momentum=0.9"], "momentum"),
        (["server_opt.name=adam"], "server_opt.name='adam' is unknown"),
        (["server_opt.name=fedadam", "server_opt.lr=-1"], "server_opt.lr=-1"),
        (["server_opt.name=fedyogi", "server_opt.betas=[0.9,1.5]"], "server_opt.betas"),
        (["server_opt.name=fedadagrad", "server_opt.tau=0"], "server_opt.tau=0"),
        (
            ["client_opt.scaffold=true", *SGD, "strategy.params.ranks=[2,4]"],
            "strategy.params.ranks",
        ),
    ],
)
def test_bad_drift_settings_are_refused_with_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


@pytest.mark.parametrize("klass", [FedSVD, FLoRA, FlexLoRA])
def test_a_method_without_an_averaged_global_refuses_at_construction(klass):
    kwargs = {"ranks": [R]} if klass is not FedSVD else {}
    with pytest.raises(ValueError, match="server_opt.name=fedadam with"):
        klass(global_adapter(), {}, server_opt={"name": "fedadam"}, **kwargs)
    with pytest.raises(ValueError, match="client_opt.scaffold=true with"):
        klass(global_adapter(), {}, scaffold=True, **kwargs)
    with pytest.raises(ValueError, match="strategy.params.ranks"):
        FedAvgLoRA(global_adapter(), {}, scaffold=True, ranks=[2, 4])


def _controlled(strategy, sampled, server_round):
    updates = client_updates(strategy.up_keys(), len(sampled), seed=server_round)
    deltas = client_updates(strategy.up_keys(), len(sampled), seed=50 + server_round)
    for update, delta in zip(updates, deltas, strict=True):
        update.update({f"control.{k}": v for k, v in delta.items()})
    return updates, deltas


def test_scaffold_bytes_and_server_control_variate():
    """Down: the global pair and c; up: the pair and delta c_k; c += |S|/N sum p_k delta c_k."""
    strategy = FFALoRA(global_adapter(), {}, scaffold=True, num_clients=6, fraction=0.5, seed=2)
    nodes = [1, 2, 3, 4, 5, 6]
    c = {k: v.double().numpy() for k, v in strategy.drift.control.items()}
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, None, {}, FakeGrid(nodes)))
        sampled = [m.metadata.dst_node_id for m in messages]
        sent = messages[0].content["arrays"]
        assert {k for k in sent if k.startswith("control.")} == {
            f"control.{k}" for k in strategy.up_keys()
        }
        per_node = (LAYERS * R * D_OUT + 2 * D_OUT + 2) * 4  # B and the head, FFA-LoRA's exchange
        assert strategy.stats.bytes_down == len(sampled) * 2 * per_node
        updates, deltas = _controlled(strategy, sampled, server_round)
        counts = [3 + n for n in sampled]
        strategy.aggregate_train(
            server_round, [reply(n, u, w) for n, u, w in zip(sampled, updates, counts, strict=True)]
        )
        assert strategy.stats.bytes_up == len(sampled) * 2 * per_node
        p = np.asarray(counts, np.float64) / sum(counts)
        for key in c:
            mean = sum(pk * d[key].double().numpy() for pk, d in zip(p, deltas, strict=True))
            c[key] = c[key] + len(sampled) / 6 * mean
            np.testing.assert_allclose(
                strategy.drift.control[key].numpy(), c[key], rtol=1e-6, atol=1e-7
            )
        assert not any(k.startswith("control.") for k in strategy.global_adapter)


def test_a_reply_without_its_control_variate_is_rejected():
    strategy = FedAvgLoRA(global_adapter(), {}, scaffold=True)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([1, 2])))
    plain = client_updates(strategy.up_keys(), 2)
    before = {k: v.clone() for k, v in strategy.global_adapter.items()}
    nodes = [m.metadata.dst_node_id for m in messages]
    strategy.aggregate_train(1, [reply(n, u, 5) for n, u in zip(nodes, plain, strict=True)])
    assert len(strategy.stats.rejected) == 2
    assert all(torch.equal(strategy.global_adapter[k], v) for k, v in before.items())


def test_the_norm_bound_holds_the_factors_not_the_control_deltas():
    """replies.norm_bound is on the trained tensors; dc_k is on the gradient's scale."""
    strategy = FFALoRA(global_adapter(), {}, scaffold=True, norm_bound=10.0)
    nodes = [m.metadata.dst_node_id for m in strategy.configure_train(1, None, {}, FakeGrid([1]))]
    updates, _ = _controlled(strategy, nodes, 1)
    key = next(k for k in updates[0] if k.startswith("control."))
    updates[0][key] = updates[0][key] * 0 + 100.0  # a huge control delta: accepted
    strategy.aggregate_train(1, [reply(nodes[0], updates[0], 5)])
    assert strategy.stats.accepted == [nodes[0]] and not strategy.stats.rejected
    factor = strategy.up_keys()[0]
    updates[0][factor] = updates[0][factor] * 0 + 100.0  # a huge factor: rejected
    strategy.configure_train(2, None, {}, FakeGrid([1]))
    strategy.aggregate_train(2, [reply(nodes[0], updates[0], 5)])
    assert "exceeds bound 10.0" in next(iter(strategy.stats.rejected.values()))


def test_resuming_a_scaffold_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="resume= with client_opt.scaffold=true"):
        compose_config([*FAST_RUN, *SGD, "client_opt.scaffold=true", f"resume={tmp_path}"])


DRIFT_RUN = [
    *FAST_RUN,
    "federation.local_steps=1",
    "client_opt.proximal_mu=0.01",
    "client_opt.scaffold=true",
]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("fed_sb", ["strategy.params.init=orthonormal", "server_opt.name=fedyogi"]),
        ("fedex_lora", []),
        ("lora_fair", ["server_opt.name=fedavgm"]),
    ],
)
def test_methods_with_their_options_through_the_client_app(data_dir, method, extra):
    """Two rounds of real client rounds (no Ray) with FedProx, SCAFFOLD and a server optimiser."""
    cfg = compose_config([*DRIFT_RUN, *SGD, f"strategy={method}", "train.lr=0.1", *extra])
    fed = prepare(cfg)
    strategy = fed.strategy
    contexts = {
        n: Context(1, n, {"partition-id": n - 1, "num-partitions": 2}, RecordDict(), {})
        for n in (1, 2)
    }
    start = {k: v.clone() for k, v in strategy.global_adapter.items()}
    for server_round in (1, 2):
        grid = FakeGrid([1, 2])
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        strategy.aggregate_train(server_round, replies)
        assert strategy.stats.replied == 2 and not strategy.stats.rejected
    assert set(strategy.drift.control) == set(strategy.up_keys())
    # A's gradient is 0 while B = 0 and tiny after one step: check c on every other tensor
    grown = [k for k in strategy.up_keys() if not k.endswith(".lora_A")]
    assert all(float(strategy.drift.control[k].abs().sum()) > 0 for k in grown)
    assert (strategy.drift.server_opt is None) == (len(extra) == 0)
    assert strategy.drift.server_opt is None or strategy.drift.server_opt.steps == 2
    moved = [
        k for k in strategy.global_adapter if not torch.equal(strategy.global_adapter[k], start[k])
    ]
    assert set(grown) <= set(moved) <= set(strategy.up_keys())  # fed_sb's B and A stay frozen


def test_simulation_with_dp_scaffold_fedprox_and_fedadam(tmp_path, data_dir):
    """FedAvg under DP (eps 3) with all three options: 2 rounds, bytes doubled, reloadable."""
    run = [
        *DRIFT_RUN,
        "dp=eps3",
        "adapter.train_head=false",
        "server_opt.name=fedadam",
        f"run_dir={tmp_path}",
    ]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2 and summary["max_epsilon"] is not None
    layers, hidden, r = 4, 64, 8
    pair = layers * r * 2 * hidden  # the head frozen: A and B only
    assert summary["bytes_up"] == summary["bytes_down"] == 2 * 2 * 2 * pair * 4  # + c / delta c_k
    ckpt = torch.load(next((tmp_path / "checkpoint").glob("tensors-*.pt")))
    assert any(k.startswith("server_opt.m.") for k in ckpt)
    assert any(k.startswith("control.") for k in ckpt)
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
