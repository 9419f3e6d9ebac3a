"""Adapter tensors <-> Flower records, reply validation and byte counts (keys: protocol.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedpeft.protocol import ARRAYS_KEY, CLIENT_SECONDS, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS


def addressees(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the messages the server sent."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def answered_node(reply: Message, addressed: Mapping[str, int]) -> int:
    """The node a reply answers for: the one its request went to (`addressees`), else its sender.

    An error the SuperLink makes for an unreachable node carries the SuperLink's own id.
    """
    reply_to, sender = reply.metadata.reply_to_message_id, reply.metadata.src_node_id
    return addressed.get(reply_to, sender) if reply_to else sender


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


#: Allowance per array for the .npy header around its data (numpy pads headers to 64 bytes).
NPY_HEADER_BYTES = 256
#: Most entries a reply's MetricRecord may hold.
MAX_METRICS = 64
#: Most CPU seconds a reply may claim for its round (about 30 years): sums stay finite.
MAX_CLIENT_SECONDS = 1e9


def _decode(key: str, array: Array, spec: TensorSpec) -> torch.Tensor:
    """The array's values, checked against the spec by what it declares and what it holds."""
    want = str(spec.dtype).removeprefix("torch.")
    if tuple(array.shape) != spec.shape:
        raise UpdateRejected(f"{key}: {_shape_problem(key, tuple(array.shape), spec.shape)}")
    if array.dtype != want:
        raise UpdateRejected(f"{key}: dtype {array.dtype}, expected {want}")
    try:
        value = np.array(array.numpy(), copy=True)
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise UpdateRejected(f"{key}: data cannot be decoded ({exc})") from exc
    if value.shape != spec.shape or str(value.dtype) != want:
        raise UpdateRejected(
            f"{key}: data holds {value.dtype} {value.shape}, declared {array.dtype} {spec.shape}"
        )
    return torch.from_numpy(value)


def _shape_problem(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """Name a rank mismatch as such: LoRA factors differ from the spec in their rank axis only."""
    axis = {"lora_A": 0, "lora_B": 1}.get(key.rsplit(".", 1)[-1])
    if axis is not None and len(got) == len(want) == 2 and got[1 - axis] == want[1 - axis]:
        return f"rank {got[axis]}, expected rank {want[axis]} (shape {got}, expected {want})"
    return f"shape {got}, expected {want}"


def validate_update(
    content: RecordDict,
    expected: Mapping[str, TensorSpec],
    max_num_examples: int,
    max_norm: float | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Check one training reply and return its tensors and weight, or raise UpdateRejected.

    A reply must hold one ArrayRecord and one MetricRecord and nothing else, no more bytes than
    the expected tensors need (checked before anything is decoded), exactly the expected keys
    with the expected shapes and dtypes (declared and actual), finite values, an optional bound
    on each tensor's Frobenius norm, a finite train-loss if any, client-seconds in
    [0, MAX_CLIENT_SECONDS] if any, and a positive integer num-examples no larger than
    `max_num_examples`.
    """
    if ARRAYS_KEY not in content.array_records:
        raise UpdateRejected(f"no '{ARRAYS_KEY}' ArrayRecord in the reply")
    if METRICS_KEY not in content.metric_records:
        raise UpdateRejected(f"no '{METRICS_KEY}' MetricRecord in the reply")
    extra_records = sorted(set(content) - {ARRAYS_KEY, METRICS_KEY})
    if extra_records:
        raise UpdateRejected(f"unexpected records in the reply: {extra_records[:3]}")
    record = content.array_records[ARRAYS_KEY]
    limit = sum(math.prod(s.shape) * s.dtype.itemsize + NPY_HEADER_BYTES for s in expected.values())
    size = sum(len(a.data) for a in record.values())
    if size > limit:
        raise UpdateRejected(f"oversized payload: {size} bytes, at most {limit} expected")
    missing = sorted(set(expected) - set(record))
    extra = sorted(set(record) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in expected.items():
        value = _decode(key, record[key], spec)
        if not torch.isfinite(value).all():
            raise UpdateRejected(f"{key}: contains NaN or Inf")
        check_norms({key: value}, [key], max_norm)
        tensors[key] = value
    metrics = content.metric_records[METRICS_KEY]
    if len(metrics) > MAX_METRICS:
        raise UpdateRejected(f"{len(metrics)} metrics, at most {MAX_METRICS} accepted")
    loss = metrics.get(TRAIN_LOSS, 0.0)
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        raise UpdateRejected(f"train-loss={loss} is not a finite number")
    seconds = metrics.get(CLIENT_SECONDS, 0.0)
    if not (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and 0 <= seconds <= MAX_CLIENT_SECONDS
    ):
        raise UpdateRejected(
            f"{CLIENT_SECONDS}={seconds} is not a number of seconds in [0, {MAX_CLIENT_SECONDS:g}]"
        )
    num_examples = metrics.get(NUM_EXAMPLES)
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


def check_norms(
    tensors: Mapping[str, torch.Tensor], keys: Iterable[str], max_norm: float | None
) -> None:
    """Reject a reply whose named tensors exceed `max_norm` in Frobenius norm (None: no bound)."""
    if max_norm is None:
        return
    for key in keys:
        if (norm := float(tensors[key].norm())) > max_norm:
            raise UpdateRejected(f"{key}: norm {norm:.3g} exceeds bound {max_norm}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TYPED_REASON = re.compile(r"^<class '[\w.]+'>:<'(.+)$", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Crash|Mismatch|Interrupt|Exit)\b.*: .+")


def short_reason(reason: str) -> str:
    """The message of an error reply without its traceback (Flower sends a remote traceback).

    The ClientApp's own message (after Flower's `Message:`), else the last exception line, else
    the last line.
    """
    text = _ANSI.sub("", reason).strip().rstrip("'>").strip()
    if "Message: " in text:
        return text.rsplit("Message: ", 1)[1].strip()
    if (typed := _TYPED_REASON.match(text)) is not None:  # a SuperNode's "<class 'E'>:<'msg'>"
        return typed.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else "unknown error"
