"""Adapter tensors <-> Flower records, reply validation and byte counts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
#: ConfigRecord key of the JSON task: what every client needs to rebuild model, adapter and data.
TASK_KEY = "task"
NUM_EXAMPLES = "num-examples"


class UpdateRejected(ValueError):
    """A client's reply cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a reply's tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack CPU copies of the tensors into an ArrayRecord, keys kept in order."""
    return ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()}
    )


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into CPU tensors (copies, writable)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in the record: elements times element size, what the wire carries."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def validate_update(
    content: RecordDict,
    expected: Mapping[str, TensorSpec],
    max_num_examples: int,
    max_norm: float | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Check one training reply and return its tensors and weight, or raise UpdateRejected.

    A reply must hold exactly the expected keys with the expected shapes and dtypes, finite values,
    an optional bound on each tensor's norm, and a positive integer num-examples no larger than
    `max_num_examples`.
    """
    if ARRAYS_KEY not in content.array_records:
        raise UpdateRejected(f"no '{ARRAYS_KEY}' ArrayRecord in the reply")
    if METRICS_KEY not in content.metric_records:
        raise UpdateRejected(f"no '{METRICS_KEY}' MetricRecord in the reply")
    record = content.array_records[ARRAYS_KEY]
    missing = sorted(set(expected) - set(record))
    extra = sorted(set(record) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in expected.items():
        array = record[key]
        if tuple(array.shape) != spec.shape:
            raise UpdateRejected(f"{key}: shape {tuple(array.shape)}, expected {spec.shape}")
        want = str(spec.dtype).removeprefix("torch.")
        if array.dtype != want:
            raise UpdateRejected(f"{key}: dtype {array.dtype}, expected {want}")
        value = torch.from_numpy(np.array(array.numpy(), copy=True))
        if not torch.isfinite(value).all():
            raise UpdateRejected(f"{key}: contains NaN or Inf")
        if max_norm is not None and (norm := float(value.norm())) > max_norm:
            raise UpdateRejected(f"{key}: norm {norm:.3g} exceeds bound {max_norm}")
        tensors[key] = value
    num_examples = content.metric_records[METRICS_KEY].get(NUM_EXAMPLES)
    if not isinstance(num_examples, int | float) or not math.isfinite(num_examples):
        raise UpdateRejected(f"{NUM_EXAMPLES} is missing or not a number")
    if num_examples <= 0 or num_examples != int(num_examples) or num_examples > max_num_examples:
        raise UpdateRejected(
            f"{NUM_EXAMPLES}={num_examples} is not an integer in [1, {max_num_examples}]"
        )
    return tensors, int(num_examples)


def metrics_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """A MetricRecord from plain numbers (ints stay ints so weights are exact)."""
    return MetricRecord(
        {k: (int(v) if isinstance(v, bool | int) else float(v)) for k, v in metrics.items()}
    )
