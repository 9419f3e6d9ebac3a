"""Hostile and malformed replies against every method: rejected before aggregation, with a reason.

Each example mixes valid replies with hostile ones (and failed nodes) in a random order. The
global adapter must stay finite and equal, bit for bit, to what the same strategy computes from
the valid replies alone.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.strategies import STRATEGIES
from tests.strategies.conftest import LAYERS, FakeGrid, R, error_reply, global_adapter

NORM_BOUND = 1e3
MAX_EXAMPLES = 1000


def _adapter(name: str) -> dict[str, torch.Tensor]:
    tensors = global_adapter()
    if name == "fed_sb":
        for layer in range(LAYERS):
            tensors[f"enc.{layer}.q.lora_R"] = torch.zeros(R, R)
    return tensors


def _strategy(name: str):
    params = {
        "fed_sb": {"init": "orthonormal"},
        "flora": {"ranks": [2, 5]},
        "hetlora": {"ranks": [2, 4], "min_rank": 1},
    }.get(name, {})
    task = {"adapter": {"rank": R, "alpha": 8.0}, "adapter_seed": 1}
    return STRATEGIES[name](
        _adapter(name),
        task,
        train_head=True,
        max_num_examples=MAX_EXAMPLES,
        norm_bound=NORM_BOUND,
        seed=3,
        **params,
    )


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _message(node: int, arrays: dict[str, Array], metrics: dict, extra: dict | None = None):
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    for key, record in (extra or {}).items():
        content[key] = record
    return Message(content, reply_to=sent)


def _lie(value: np.ndarray, data: np.ndarray) -> Array:
    """An Array that declares `value`'s dtype and shape but carries `data`."""
    buffer = io.BytesIO()
    np.save(buffer, data, allow_pickle=False)
    return Array(str(value.dtype), tuple(value.shape), "numpy.ndarray", buffer.getvalue())


def _hostile(kind: str, node: int, good: dict[str, np.ndarray]) -> Message:
    """A reply from `node` that is valid except for one hostile property."""
    arrays = {k: _array(v) for k, v in good.items()}
    metrics: dict = {"num-examples": 10, "train-loss": 0.5, "client-seconds": 2.0}
    extra = None
    key = next(k for k in good if ".lora_" in k)
    value = good[key]
    if kind == "missing_key":
        arrays.pop(key)
    elif kind == "extra_key":
        arrays["base.encoder.weight"] = _array(np.ones((4, 4), np.float32))
    elif kind == "wrong_shape":
        arrays[key] = _array(np.ones((value.shape[0] + 1, value.shape[1]), np.float32))
    elif kind == "wrong_rank":
        axis = 0 if key.endswith("lora_A") else 1
        shape = list(value.shape)
        shape[axis] += 3
        arrays[key] = _array(np.ones(shape, np.float32))
    elif kind == "wrong_dtype":
        arrays[key] = _array(value.astype(np.float64))
    elif kind == "declared_not_actual":
        arrays[key] = _lie(value, value.astype(np.float64))
    elif kind == "undecodable":
        arrays[key] = Array("float32", tuple(value.shape), "numpy.ndarray", b"\x00garbage")
    elif kind == "nan":
        bad = value.copy()
        bad.flat[0] = np.nan
        arrays[key] = _array(bad)
    elif kind == "inf":
        bad = value.copy()
        bad.flat[-1] = -np.inf
        arrays[key] = _array(bad)
    elif kind == "huge_norm":
        arrays[key] = _array(value * 1e6 + 1e3)
    elif kind == "oversized":
        extra = {"junk": ArrayRecord({"x": _array(np.zeros(100_000, np.float32))})}
    elif kind == "oversized_array":
        arrays[key] = _lie(value, np.zeros(100_000, np.float32))
    elif kind == "extra_config":
        extra = {"config": ConfigRecord({"note": "x" * 1000})}
    elif kind in ("zero_examples", "negative_examples", "fractional_examples", "too_many_examples"):
        metrics["num-examples"] = {
            "zero_examples": 0,
            "negative_examples": -5,
            "fractional_examples": 2.5,
            "too_many_examples": MAX_EXAMPLES + 1,
        }[kind]
    elif kind == "nan_examples":
        metrics["num-examples"] = float("nan")
    elif kind == "no_examples":
        metrics.pop("num-examples")
    elif kind == "nan_loss":
        metrics["train-loss"] = float("inf")
    elif kind in ("nan_seconds", "negative_seconds", "huge_seconds"):
        metrics["client-seconds"] = {
            "nan_seconds": float("nan"),
            "negative_seconds": -1.0,
            "huge_seconds": 1e300,
        }[kind]
    else:
        raise AssertionError(kind)
    return _message(node, arrays, metrics, extra)


HOSTILE = [
    "missing_key",
    "extra_key",
    "wrong_shape",
    "wrong_rank",
    "wrong_dtype",
    "declared_not_actual",
    "undecodable",
    "nan",
    "inf",
    "huge_norm",
    "oversized",
    "oversized_array",
    "extra_config",
    "zero_examples",
    "negative_examples",
    "fractional_examples",
    "too_many_examples",
    "nan_examples",
    "no_examples",
    "nan_loss",
    "nan_seconds",
    "negative_seconds",
    "huge_seconds",
]


def _good(strategy, node: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        k: rng.standard_normal(s.shape).astype(np.float32)
        for k, s in strategy.up_specs(node).items()
    }


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    valid=st.lists(st.integers(1, 50), min_size=1, max_size=3),
    hostile=st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=4),
    failed=st.integers(0, 2),
    order_seed=st.integers(0, 2**16),
)
def test_hostile_replies_are_rejected_and_the_rest_aggregated(
    name, valid, hostile, failed, order_seed
):
    nodes = list(range(1, len(valid) + len(hostile) + failed + 1))
    attacked, reference = _strategy(name), _strategy(name)
    for strategy in (attacked, reference):
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(nodes)))
    rng = np.random.default_rng(order_seed)
    good = {n: _good(attacked, n, rng) for n in nodes}
    valid_nodes = nodes[: len(valid)]
    replies = [
        _message(
            n,
            {k: _array(v) for k, v in good[n].items()},
            {"num-examples": w, "train-loss": 0.5, "client-seconds": 1.5},
        )
        for n, w in zip(valid_nodes, valid)
    ]
    hostile_nodes = nodes[len(valid) : len(valid) + len(hostile)]
    bad = [_hostile(kind, n, good[n]) for n, kind in zip(hostile_nodes, hostile)]
    errors = [error_reply(n, "boom") for n in nodes[len(valid) + len(hostile) :]]
    mixed = replies + bad + errors
    rng.shuffle(mixed)

    attacked.aggregate_train(1, mixed)
    reference.aggregate_train(1, replies)

    assert set(attacked.stats.rejected) == set(hostile_nodes), attacked.stats.rejected
    assert all(attacked.stats.rejected.values())
    assert set(attacked.stats.failed) == set(nodes[len(valid) + len(hostile) :])
    assert attacked.stats.replied == len(valid)
    # only the accepted replies' CPU seconds count (hostile ones claim 2.0 or a bad value)
    assert attacked.stats.client_seconds == pytest.approx(1.5 * len(valid))
    assert attacked.global_adapter.keys() == reference.global_adapter.keys()
    for key, value in attacked.global_adapter.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, reference.global_adapter[key]), key
    assert len(attacked.base_stacks()) == len(reference.base_stacks())
    for mine, theirs in zip(attacked.base_stacks(), reference.base_stacks()):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("kind", HOSTILE)
def test_every_hostile_kind_is_rejected_with_its_reason(kind):
    strategy = _strategy("fedavg")
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    rng = np.random.default_rng(0)
    valid = _message(
        2, {k: _array(v) for k, v in _good(strategy, 2, rng).items()}, {"num-examples": 5}
    )
    strategy.aggregate_train(1, [_hostile(kind, 1, _good(strategy, 1, rng)), valid])
    assert list(strategy.stats.rejected) == [1] and strategy.stats.replied == 1
    reason = strategy.stats.rejected[1]
    expected = {
        "missing_key": "wrong keys",
        "extra_key": "wrong keys",
        "wrong_shape": "shape",
        "wrong_rank": "rank",
        "wrong_dtype": "dtype",
        "declared_not_actual": "data holds float64",
        "undecodable": "cannot be decoded",
        "nan": "NaN or Inf",
        "inf": "NaN or Inf",
        "huge_norm": "exceeds bound",
        "oversized": "unexpected records",
        "oversized_array": "oversized payload",
        "extra_config": "unexpected records",
        "nan_loss": "train-loss",
        "nan_seconds": "client-seconds",
        "negative_seconds": "client-seconds",
        "huge_seconds": "client-seconds",
    }.get(kind, "num-examples")
    assert expected in reason, reason
