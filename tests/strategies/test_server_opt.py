"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against their float64 formulas."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.strategies import FedAvgLoRA, FedSB, FFALoRA
from fedpeft.strategies.server_opt import NAMES, ServerOptimizer
from tests.strategies.conftest import FakeGrid, client_updates, global_adapter, reply

RULES = [n for n in NAMES if n != "none"]


def reference_steps(name, lr, b1, b2, tau, momentum, x0, targets):
    """Reddi et al. Algorithm 2 (FedAvgM: Hsu et al.) in numpy float64, one step per target."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.full_like(x0, tau**2)
    path = []
    for target in targets:
        delta = target - x
        if name == "fedavgm":
            m = momentum * m + delta
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * delta
            if name == "fedadagrad":
                v = v + delta**2
            elif name == "fedadam":
                v = b2 * v + (1 - b2) * delta**2
            else:
                v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            x = x + lr * m / (np.sqrt(v) + tau)
        path.append(x.copy())
    return path


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rounds=st.integers(1, 5),
    lr=st.sampled_from([1e-3, 1e-1, 1.0]),
    betas=st.sampled_from([(0.9, 0.99), (0.0, 0.5), (0.5, 0.999)]),
    tau=st.sampled_from([1e-3, 1e-1]),
    momentum=st.sampled_from([0.0, 0.9]),
)
def test_each_rule_matches_its_float64_formula(name, seed, rounds, lr, betas, tau, momentum):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(5, 3))
    targets = [x0 + rng.normal(scale=10.0 ** rng.integers(-4, 1), size=x0.shape)]
    for _ in range(rounds - 1):
        targets.append(targets[-1] + rng.normal(scale=0.1, size=x0.shape))
    opt = ServerOptimizer(name, lr, betas, tau, momentum)
    x = torch.from_numpy(x0)
    expected = reference_steps(name, lr, *betas, tau, momentum, x0, targets)
    for target, want in zip(targets, expected, strict=True):
        x = opt.step({"w": x}, {"w": torch.from_numpy(target)})["w"]
        np.testing.assert_allclose(x.numpy(), want, rtol=1e-12, atol=1e-14)


def _run(strategy, rounds, first=1, nodes=(1, 2, 3)):
    """Drive `rounds` rounds with replies that depend only on (round, node)."""
    for server_round in range(first, first + rounds):
        messages = strategy.configure_train(server_round, None, {}, FakeGrid(list(nodes)))
        sampled = [m.metadata.dst_node_id for m in messages]
        updates = client_updates(strategy.up_keys(), len(sampled), seed=100 + server_round)
        if strategy.drift.scaffold:
            deltas = client_updates(strategy.up_keys(), len(sampled), seed=200 + server_round)
            for update, delta in zip(updates, deltas, strict=True):
                update.update({f"control.{k}": v for k, v in delta.items()})
        strategy.aggregate_train(
            server_round, [reply(n, u, 3 + n) for n, u in zip(sampled, updates, strict=True)]
        )


def test_fedavgm_at_lr_1_without_momentum_is_plain_fedavg_bit_for_bit():
    plain = FedAvgLoRA(global_adapter(), {})
    opt = FedAvgLoRA(global_adapter(), {}, server_opt={"name": "fedavgm", "lr": 1.0, "momentum": 0})
    _run(plain, 3)
    _run(opt, 3)
    for key, value in plain.global_adapter.items():
        assert torch.equal(opt.global_adapter[key], value)


@pytest.mark.parametrize("name", RULES)
def test_the_strategy_steps_from_the_previous_global_on_the_averaged_tensors(name):
    """Delta = the method's weighted average - the global before the round, per averaged key."""
    settings_ = {"name": name, "lr": 0.05, "betas": (0.8, 0.9), "tau": 1e-2, "momentum": 0.7}
    strategy = FFALoRA(global_adapter(), {}, server_opt=settings_)
    plain = FFALoRA(global_adapter(), {})
    x0 = {k: v.double().numpy() for k, v in strategy.global_adapter.items()}
    targets = {k: [] for k in strategy.up_keys()}
    for server_round in (1, 2, 3):
        before = {k: v.clone() for k, v in strategy.global_adapter.items()}
        _run(strategy, 1, first=server_round)
        plain.global_adapter = before
        _run(plain, 1, first=server_round)  # the plain average from the same global
        for key in targets:
            targets[key].append(plain.global_adapter[key].double().numpy())
        a_keys = strategy.factor_keys("lora_A")
        assert all(torch.equal(strategy.global_adapter[k], before[k]) for k in a_keys)
    for key, path in targets.items():
        # the reference steps from the float32 global each round, as the strategy stores it
        x = x0[key]
        want = reference_steps(name, 0.05, 0.8, 0.9, 1e-2, 0.7, x, path)[-1]
        np.testing.assert_allclose(strategy.global_adapter[key].numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_resume_mid_run_equals_an_uninterrupted_run(name):
    """state_dict after round 2 into a fresh strategy (meta through JSON), then 2 more rounds."""
    kwargs = {"server_opt": {"name": name, "lr": 0.1}, "scaffold": True, "num_clients": 4}
    whole = FedAvgLoRA(global_adapter(), {}, seed=3, fraction=0.5, **kwargs)
    _run(whole, 4, nodes=(1, 2, 3, 4))
    first = FedAvgLoRA(global_adapter(), {}, seed=3, fraction=0.5, **kwargs)
    _run(first, 2, nodes=(1, 2, 3, 4))
    tensors, meta = first.state_dict()
    resumed = FedAvgLoRA(global_adapter(), {}, seed=3, fraction=0.5, **kwargs)
    saved = {k: v.clone() for k, v in tensors.items()}
    resumed.load_state_dict(saved, json.loads(json.dumps(meta)))
    _run(resumed, 2, first=3, nodes=(1, 2, 3, 4))
    for key, value in whole.global_adapter.items():
        assert torch.equal(resumed.global_adapter[key], value), key
    for key, value in whole.drift.control.items():
        assert torch.equal(resumed.drift.control[key], value), key
    assert resumed.drift.server_opt.steps == whole.drift.server_opt.steps == 4


def test_a_checkpoint_of_another_rule_is_refused():
    first = FedSB(
        {"l.lora_A": torch.randn(2, 3), "l.lora_B": torch.randn(3, 2), "l.lora_R": torch.eye(2)},
        {},
        init="orthonormal",
        server_opt={"name": "fedadam"},
    )
    tensors, meta = first.state_dict()
    other = FedSB(
        {k: v.clone() for k, v in first.global_adapter.items()},
        {},
        init="orthonormal",
        server_opt={"name": "fedyogi"},
    )
    with pytest.raises(ValueError, match="server_opt.name"):
        other.load_state_dict(tensors, meta)


@pytest.mark.parametrize(
    ("settings_", "field"),
    [
        ({"name": "adam"}, "server_opt.name"),
        ({"name": "fedadam", "lr": 0}, "server_opt.lr"),
        ({"name": "fedadam", "betas": (0.9, 1.0)}, "server_opt.betas"),
        ({"name": "fedyogi", "tau": 0}, "server_opt.tau"),
        ({"name": "fedavgm", "momentum": 1.0}, "server_opt.momentum"),
    ],
)
def test_bad_settings_name_the_field(settings_, field):
    with pytest.raises(ValueError, match=field):
        ServerOptimizer(**settings_)
