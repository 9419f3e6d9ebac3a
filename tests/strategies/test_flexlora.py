"""FlexLoRA (docs/algorithms.md §9): SVD truncation against the dense float64 reference, bytes, a
run."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft import lowrank
from fedpeft.cli import simulate
from fedpeft.strategies import FlexLoRA
from tests.conftest import FAST_RUN, plain_peft_metrics
from tests.strategies.conftest import D_IN, D_OUT, LAYERS, FakeGrid, R, global_adapter, reply


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    alphas=st.lists(st.floats(1.0, 32.0), min_size=4, max_size=4),
    shape=st.sampled_from([(8, 13), (20, 20), (30, 9)]),
    layers=st.integers(1, 3),
    target=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_truncation_is_the_best_rank_r_approximation(ranks, alphas, shape, layers, target, seed):
    """(a) s B A = np.linalg.svd truncation of dense dW; (b) Eckart-Young; (c) A orthonormal;
    (d) r >= rank(dW) gives dW exactly."""
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    k = len(ranks)
    a = [torch.randn(layers, r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    b = [torch.randn(layers, d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    s = [alphas[i] / ranks[i] for i in range(k)]
    p = lowrank.normalize_weights(torch.randint(1, 300, (k,), generator=g))
    a_st, b_st = lowrank.flora_stack(a, b, p, s)
    us, vh = lowrank.stacked_svd(a_st, b_st)
    target = min(target, d_out, d_in)
    s_t = alphas[0] / target
    a_t, b_t = lowrank.flexlora_truncate(us, vh, target, s_t, torch.Generator().manual_seed(1))
    for layer in range(layers):
        dense = sum(p[i] * s[i] * b[i][layer] @ a[i][layer] for i in range(k)).numpy()
        u, sv, vt = np.linalg.svd(dense)
        best = (u[:, :target] * sv[:target]) @ vt[:target]
        got = (s_t * b_t[layer] @ a_t[layer]).numpy()
        scale = np.linalg.norm(dense)
        assert np.linalg.norm(got - best) <= 1e-10 * scale
        residual = np.linalg.norm(dense - got) ** 2
        assert residual == pytest.approx(float(np.sum(sv[target:] ** 2)), abs=1e-10 * scale**2)
        gram = (a_t[layer] @ a_t[layer].T).numpy()
        np.testing.assert_allclose(gram, np.eye(target), atol=1e-10)
        if target >= sum(ranks):
            assert np.linalg.norm(got - dense) <= 1e-10 * scale


def _strategy(**kw):
    task = {"adapter": {"rank": R, "alpha": 16.0}, "adapter_seed": 0}
    return FlexLoRA(global_adapter(), task, max_num_examples=1000, ranks=[2, 5, 3], **kw)


def _updates(strategy, nodes, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s.shape, generator=g) for k, s in strategy.up_specs(n).items()}
        for n in nodes
    ]


def test_server_round_sends_each_client_its_truncation_and_bytes_match_the_table():
    strategy = _strategy(train_head=False, fraction=0.5, seed=3)
    nodes = [1, 2, 3, 4, 5, 6]
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    assert strategy.stats.bytes_down == 0  # round 1: peft init at each client's rank
    sampled = [m.metadata.dst_node_id for m in messages]
    ranks = [strategy.rank_of(n) for n in sampled]
    updates = _updates(strategy, sampled, 4)
    weights = [5 + n for n in sampled]
    strategy.aggregate_train(1, [reply(n, u, w) for n, u, w in zip(sampled, updates, weights)])
    assert strategy.stats.bytes_up == sum(ranks) * (D_IN + D_OUT) * LAYERS * 4
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    again = list(strategy.configure_train(2, None, {}, FakeGrid(nodes)))
    expected = 0
    for msg in again:
        node = msg.metadata.dst_node_id
        r = strategy.rank_of(node)
        s_r = 16.0 / r  # scaling=shared: alpha_k = 16 for every rank
        assert msg.content["config"]["adapter-rank"] == r
        arrays = msg.content.array_records["arrays"]
        expected += r * (D_IN + D_OUT) * LAYERS * 4
        for layer in range(LAYERS):
            name = f"enc.{layer}.q"
            dense = sum(
                pk
                * (16.0 / u[f"{name}.lora_A"].shape[0])
                * u[f"{name}.lora_B"].double()
                @ u[f"{name}.lora_A"].double()
                for pk, u in zip(p, updates)
            ).numpy()
            a = torch.from_numpy(arrays[f"{name}.lora_A"].numpy()).double()
            b = torch.from_numpy(arrays[f"{name}.lora_B"].numpy()).double()
            sv = np.linalg.svd(dense, compute_uv=False)
            # float32 server: s_r B A is a rank-r fit within 1e-5 of the Eckart-Young optimum
            error = np.linalg.norm(dense - s_r * (b @ a).numpy()) ** 2
            assert error <= np.sum(sv[r:] ** 2) + 1e-5 * np.sum(sv**2)
            assert np.linalg.matrix_rank(a.numpy()) == r
    assert strategy.stats.bytes_down == expected
    (delta,) = strategy.base_stacks()
    for layer in range(LAYERS):
        name = f"enc.{layer}.q"
        assert torch.count_nonzero(strategy.global_adapter[f"{name}.lora_B"]) == 0


def test_rank_above_the_layer_is_refused():
    with pytest.raises(ValueError, match="strategy.params.ranks"):
        FlexLoRA(global_adapter(), {"adapter": {"rank": R}}, ranks=[4, 13])


def test_simulation_and_saved_adapter(tmp_path, data_dir):
    run = [*FAST_RUN, "strategy=flexlora", "strategy.params.ranks=[4,8]", f"run_dir={tmp_path}"]
    summary = simulate(run)
    assert summary["rounds_completed"] == 2
    layers, hidden, head = 4, 64, 2 * 64 + 2
    up = [layers * r * 2 * hidden + head for r in (4, 8)]
    assert summary["bytes_up"] == 2 * sum(up) * 4
    assert summary["bytes_down"] == (2 * head + sum(up)) * 4  # round 2: each its own rank
    metrics = plain_peft_metrics(run, summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
