"""FedRot-LoRA (docs/algorithms.md, "FedRot-LoRA"): replies rotated towards the global pair, then
FedAvg; the alternating schedule; its refusals; a federation through the real ClientApp."""

import pytest
import torch

from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import prepare
from fedpeft.strategies import FedAvgLoRA, FedRotLoRA
from tests.conftest import FAST_RUN, in_process_rounds
from tests.strategies.conftest import D_IN, D_OUT, LAYERS, FakeGrid, R, global_adapter, reply

WEIGHTS = [4, 8, 12]


def _rotated_clients(strategy, seed: int = 5) -> tuple[list[dict], dict]:
    """Three replies that are one common pair (A*, B*) in three random frames, and that pair."""
    g = torch.Generator().manual_seed(seed)
    common = {}
    for n in range(LAYERS):
        common[f"enc.{n}.q.lora_A"] = torch.randn(R, D_IN, generator=g, dtype=torch.float64)
        common[f"enc.{n}.q.lora_B"] = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    updates = []
    for _ in WEIGHTS:
        update = {}
        for n in range(LAYERS):
            q, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
            update[f"enc.{n}.q.lora_A"] = (q.T @ common[f"enc.{n}.q.lora_A"]).float()
            update[f"enc.{n}.q.lora_B"] = (common[f"enc.{n}.q.lora_B"] @ q).float()
        update["head.classifier.weight"] = torch.randn(2, D_OUT, generator=g)
        update["head.classifier.bias"] = torch.randn(2, generator=g)
        updates.append(update)
    return updates, common


def _product_error(strategy, common) -> float:
    worst = 0.0
    for n in range(LAYERS):
        b, a = (strategy.global_adapter[f"enc.{n}.q.lora_{f}"].double() for f in "BA")
        dense = common[f"enc.{n}.q.lora_B"] @ common[f"enc.{n}.q.lora_A"]
        worst = max(worst, float(torch.linalg.norm(b @ a - dense) / torch.linalg.norm(dense)))
    return worst


@pytest.mark.parametrize("server_round", [2, 3])
def test_clients_that_differ_by_a_rotation_average_exactly_where_fedavg_does_not(server_round):
    """The global pair is the common pair's frame: round 2 fits on A, round 3 on B."""
    results = {}
    for cls in (FedAvgLoRA, FedRotLoRA):
        kwargs = {"rotate_lambda": 1.0} if cls is FedRotLoRA else {}
        strategy = cls(global_adapter(), {}, train_head=True, max_num_examples=100, **kwargs)
        updates, common = _rotated_clients(strategy)
        strategy.global_adapter.update({k: v.float() for k, v in common.items()})
        replies = [reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))]
        strategy.aggregate_train(server_round, replies)
        results[cls.name] = _product_error(strategy, common)
        heads = sum(w * u["head.classifier.weight"].double() for u, w in zip(updates, WEIGHTS))
        assert torch.allclose(
            strategy.global_adapter["head.classifier.weight"].double(), heads / 24, atol=1e-6
        )  # the head is averaged, never rotated
    assert results["fedrot_lora"] < 1e-6 < 0.1 < results["fedavg"]


def test_round_one_is_not_rotated_and_the_factor_alternates():
    strategy = FedRotLoRA(global_adapter(), {}, train_head=False, max_num_examples=100)
    assert [strategy.aligned_factor(t) for t in range(1, 6)] == [None, "A", "B", "A", "B"]
    fixed = FedRotLoRA(
        global_adapter(), {}, train_head=False, max_num_examples=100, align_factor="B"
    )
    assert [fixed.aligned_factor(t) for t in range(1, 4)] == [None, "B", "B"]
    off = FedRotLoRA(global_adapter(), {}, train_head=False, max_num_examples=100, rotate_lambda=0)
    assert off.aligned_factor(2) is None  # lambda 0 is FedAvg


def test_rotation_adds_no_bytes():
    rot = FedRotLoRA(global_adapter(), {}, train_head=False, max_num_examples=100)
    avg = FedAvgLoRA(global_adapter(), {}, train_head=False, max_num_examples=100)
    for strategy in (rot, avg):
        list(strategy.configure_train(1, None, {}, FakeGrid([1, 2, 3])))
    assert rot.stats.bytes_down == avg.stats.bytes_down == 3 * LAYERS * R * (D_IN + D_OUT) * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.params.rotate_lambda=1.5"], "rotate_lambda=1.5 must be in \\[0, 1\\]"),
        (["strategy.params.align_factor=C"], "align_factor=C is unknown"),
        (["+strategy.params.ranks=[4,8]"], "fedrot_lora cannot train clients at different ranks"),
        (["client_opt.scaffold=true", "train.optimizer=sgd"], "scaffold=true with strategy"),
    ],
)
def test_what_fedrot_cannot_run_with_is_refused_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["strategy=fedrot_lora", *overrides])


def test_a_federation_trains_through_the_real_client_and_keeps_products_finite(tmp_path, data_dir):
    fed = prepare(compose_config([*FAST_RUN, "strategy=fedrot_lora", "federation.rounds=3"]))
    stats = in_process_rounds(fed, rounds=3, state_dir=tmp_path)
    assert [s["replied"] for s in stats] == [2, 2, 2]
    assert all(torch.isfinite(t).all() for t in fed.strategy.global_adapter.values())
    assert 0.0 < fed.evaluator(fed.strategy.global_adapter)["accuracy"] <= 1.0
