import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedpeft.records import (
    TensorSpec,
    UpdateRejected,
    from_record,
    record_bytes,
    to_record,
    validate_update,
)

EXPECTED = {"l.lora_B": TensorSpec((6, 2)), "head.w": TensorSpec((3,))}


def _reply(tensors, num_examples=10, **metrics):
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in tensors.items()})
    metrics = {"num-examples": num_examples, **metrics}
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


def _good():
    return {"l.lora_B": np.ones((6, 2), np.float32), "head.w": np.ones(3, np.float32)}


def test_roundtrip_and_bytes():
    tensors = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    record = to_record(tensors)
    assert record_bytes(record) == (20 + 7) * 4
    back = from_record(record)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_valid_reply_passes():
    tensors, weight = validate_update(_reply(_good()), EXPECTED, max_num_examples=100)
    assert weight == 10 and tensors["l.lora_B"].shape == (6, 2)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.pop("head.w"), "wrong keys"),
        (lambda t: t.update({"base.weight": np.ones(2, np.float32)}), "wrong keys"),
        (lambda t: t.update({"l.lora_B": np.ones((6, 3), np.float32)}), "shape"),
        (lambda t: t.update({"l.lora_B": np.ones((6, 2), np.float64)}), "dtype"),
        (lambda t: t["l.lora_B"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda t: t["head.w"].__setitem__(0, np.inf), "NaN or Inf"),
    ],
)
def test_bad_tensors_rejected(mutate, reason):
    tensors = _good()
    mutate(tensors)
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(_reply(tensors), EXPECTED, max_num_examples=100)


@pytest.mark.parametrize("n", [0, -3, 2.5, 101, float("nan")])
def test_bad_num_examples_rejected(n):
    with pytest.raises(UpdateRejected, match="num-examples"):
        validate_update(_reply(_good(), n), EXPECTED, max_num_examples=100)


@pytest.mark.parametrize("seconds", [0, 0.0, 12.5, 1e9])
def test_client_seconds_in_range_pass(seconds):
    reply = _reply(_good(), **{"client-seconds": seconds})
    assert validate_update(reply, EXPECTED, max_num_examples=100)[1] == 10


@pytest.mark.parametrize("seconds", [-0.5, float("nan"), float("inf"), 2e9, [1.0, 2.0]])
def test_bad_client_seconds_rejected(seconds):
    with pytest.raises(UpdateRejected, match="client-seconds"):
        validate_update(_reply(_good(), **{"client-seconds": seconds}), EXPECTED, 100)


def test_norm_bound():
    tensors = _good()
    tensors["l.lora_B"] *= 1e6
    with pytest.raises(UpdateRejected, match="norm"):
        validate_update(_reply(tensors), EXPECTED, max_num_examples=100, max_norm=1e3)
