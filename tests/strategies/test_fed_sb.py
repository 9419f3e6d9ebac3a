import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.strategies import FedSB
from fedpeft.strategies.fed_sb import calibration_step
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import (
    D_IN,
    D_OUT,
    LAYERS,
    FakeGrid,
    R,
    global_adapter,
    reply,
)


def _adapter():
    tensors = global_adapter()
    for layer in range(LAYERS):
        tensors[f"enc.{layer}.q.lora_R"] = torch.zeros(R, R)
    return tensors


def _strategy(**kw):
    kw = {"init": "orthonormal", "train_head": False, "max_num_examples": 100, **kw}
    return FedSB(_adapter(), {"adapter_seed": 3}, **kw)


def test_orthonormal_init_is_per_layer_and_r_is_zero():
    g = _strategy().global_adapter
    eye = torch.eye(R)
    for layer in range(LAYERS):
        b, a = g[f"enc.{layer}.q.lora_B"], g[f"enc.{layer}.q.lora_A"]
        torch.testing.assert_close(b.T @ b, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)
        assert float(g[f"enc.{layer}.q.lora_R"].abs().sum()) == 0
    assert not torch.equal(g["enc.0.q.lora_A"], g["enc.1.q.lora_A"])


def test_aggregation_is_exact():
    """B (sum p_k R_k) A = sum p_k B R_k A."""
    strategy = _strategy(train_head=True)
    start = {k: v.clone() for k, v in strategy.global_adapter.items()}
    keys = strategy.up_keys()
    assert all(k.endswith(".lora_R") or k.startswith("head.") for k in keys)
    g = torch.Generator().manual_seed(4)
    updates = [{k: torch.randn(start[k].shape, generator=g) for k in keys} for _ in range(3)]
    weights = [2, 3, 5]
    strategy.aggregate_train(1, [reply(i, u, w) for i, (u, w) in enumerate(zip(updates, weights))])
    p = torch.tensor(weights, dtype=torch.float64) / 10
    for layer in range(LAYERS):
        name = f"enc.{layer}.q"
        b, a = start[f"{name}.lora_B"].double(), start[f"{name}.lora_A"].double()
        ideal = sum(pk * b @ u[f"{name}.lora_R"].double() @ a for pk, u in zip(p, updates))
        merged = b @ strategy.global_adapter[f"{name}.lora_R"].double() @ a
        torch.testing.assert_close(merged, ideal, atol=1e-6, rtol=1e-6)
        assert torch.equal(strategy.global_adapter[f"{name}.lora_A"], start[f"{name}.lora_A"])


def test_bytes_match_the_communication_table():
    strategy = _strategy()
    nodes = [1, 2, 3]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    once = LAYERS * R * (D_IN + D_OUT)  # A and B, the first time a node is seen
    assert strategy.stats.bytes_down == 3 * (LAYERS * R * R + once) * 4
    replies = []
    for msg in messages:
        update = {k: torch.randn(R, R) for k in strategy.up_keys()}
        sent = reply(msg.metadata.dst_node_id, update, 5)
        sent.content["metrics"]["frozen-version"] = 1
        replies.append(sent)
    strategy.aggregate_train(1, replies)
    assert strategy.stats.bytes_up == 3 * LAYERS * R * R * 4
    list(strategy.configure_train(2, None, {}, FakeGrid(nodes + [4])))
    assert strategy.stats.bytes_down == (4 * LAYERS * R * R + once) * 4  # only node 4 gets A, B


def test_lora_sb_calibration_is_the_truncated_svd_of_the_sign_step():
    strategy = _strategy(init="lora_sb", calibration_lr=0.5)
    g = torch.Generator().manual_seed(0)
    grads = {f"enc.{n}.q": torch.randn(D_OUT, D_IN, generator=g) for n in range(LAYERS)}
    strategy.calibrate(iter(grads.items()))
    for name, grad in grads.items():
        u, s, vh = torch.linalg.svd(-0.5 * torch.sign(grad.double()))
        best = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
        b, r, a = (strategy.global_adapter[f"{name}.lora_{f}"].double() for f in "BRA")
        torch.testing.assert_close(b @ r @ a, best, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="calibration_examples"):
        _strategy(init="lora_sb", calibration_examples=0)
    with pytest.raises(ValueError, match="init"):
        _strategy(init="nope")


def test_calibration_step_is_the_fed_sb_codes_first_warm_up_step():
    # Fed-SB's commonsense script: lr 1e-4, warm-up 0.02, 170k examples at batch 10, 2 epochs
    assert calibration_step(1e-4, 0.02, 17_000 * 2) == pytest.approx(1.4706e-7, rel=1e-4)
    assert calibration_step(3e-3, 0.5, 12) == pytest.approx(5e-4, rel=1e-12)
    for bad in ((0.0, 0.02, 10), (1e-3, 0.0, 10), (1e-3, 1.5, 10), (1e-3, 0.02, 0)):
        with pytest.raises(ValueError):
            calibration_step(*bad)
    with pytest.raises(ValueError, match="calibration_lr=null"):
        _strategy(init="lora_sb")  # no run lr or planned steps to derive it from
    task = {"adapter_seed": 3, "train": {"lr": 2e-3}}
    derived = FedSB(_adapter(), task, init="lora_sb", total_steps=40, warmup_ratio=0.1)
    assert derived.calibration_lr == pytest.approx(2e-3 / (0.1 * 40), rel=1e-12)


def test_run_derives_the_calibration_step_and_r_scales_with_it(data_dir):
    """eta = train.lr / (warmup_ratio x rounds x clients x local steps); R_init is eta S."""
    run = [*FAST_RUN, "strategy=fed_sb", "strategy.params.calibration_examples=16"]
    first = prepare(compose_config(run)).strategy
    assert first.calibration_lr == pytest.approx(3e-3 / (0.02 * 2 * 2 * 3), rel=1e-12)
    second = prepare(compose_config([*run, "strategy.params.warmup_ratio=0.08"])).strategy
    assert second.calibration_lr == pytest.approx(first.calibration_lr / 4, rel=1e-12)
    for key in first.factor_keys("lora_R"):
        r1, r2 = first.global_adapter[key].double(), second.global_adapter[key].double()
        assert r1.norm() > 0
        torch.testing.assert_close(r2, r1 / 4, rtol=1e-5, atol=1e-6 * r1.norm().item())
    explicit = prepare(compose_config([*run, "strategy.params.calibration_lr=1e-3"])).strategy
    assert explicit.calibration_lr == 1e-3


def test_client_that_lost_its_frozen_factors_fails_and_gets_them_again(data_dir):
    cfg = compose_config([*FAST_RUN, "strategy=fed_sb", "strategy.params.init=orthonormal"])
    fed = prepare(cfg)
    grid, strategy = FakeGrid([5]), fed.strategy
    ctx = Context(1, 5, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    (msg,) = strategy.configure_train(1, None, {}, grid)
    strategy.aggregate_train(1, [train(msg, ctx)])
    assert strategy.roster.versions[5] == 1
    (msg,) = strategy.configure_train(2, None, {}, grid)
    assert not any(k.startswith("frozen.") for k in msg.content["arrays"])
    fresh = Context(1, 5, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    with pytest.raises(RuntimeError, match="frozen-version mismatch") as failure:
        train(msg, fresh)
    strategy.aggregate_train(2, [Message(Error(code=1, reason=str(failure.value)), reply_to=msg)])
    (msg,) = strategy.configure_train(3, None, {}, grid)
    assert sum(k.startswith("frozen.") for k in msg.content["arrays"]) == 2 * 4  # A, B x 4 layers
    strategy.aggregate_train(3, [train(msg, fresh)])
    assert strategy.roster.versions[5] == 1


def test_simulation_excludes_calibration_data_and_saves_plain_lora(tmp_path, data_dir):
    run = [*FAST_RUN, "strategy=fed_sb", "strategy.params.calibration_examples=32"]
    summary = simulate([*run, f"run_dir={tmp_path}"])
    assert summary["rounds_completed"] == 2
    layers, rank, head = 4, 8, 2 * 64 + 2
    assert summary["bytes_up"] == 2 * 2 * (layers * rank * rank + head) * 4
    once = layers * rank * 2 * 64
    assert summary["bytes_down"] == (2 * 2 * (layers * rank * rank + head) + 2 * once) * 4
    metrics = plain_peft_metrics(run, summary["adapter_dir"], skip_test=32)
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
