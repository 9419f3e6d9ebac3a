"""What a node accepts from the server: the round's task parsed strictly, bounded and pinned.

The task is JSON written by the server, on the far side of the node's trust boundary. Before
anything reads it, the node parses it with NaN and Infinity refused (Python's json accepts both),
checks its DP settings (privacy.DPSettings.parse: finite, in range, known keys and enum values),
types the whole task (round_task.RoundTask: every section's keys, types and ranges), bounds the
sizes that decide its memory and time (batch, sequence length, rank, local steps,
FLoRA's stack depth; each cap a node-config key), and, on a deployed node, refuses values that
would make it read a file or a hub id the server chose (`model.name_or_path`, `model.revision`,
`dataset.path`) unless its node config pins or allows them. Every refusal is a TaskRefused whose
text depends on the task and node config only, never on the node's data.

| node config key | default | meaning |
|---|---|---|
| `max-batch-size` | 1024 | largest train.batch_size (and eval batch) the node runs |
| `max-length` | 4096 | largest train.max_length (tokens per example) |
| `max-rank` | 256 | largest LoRA rank (adapter.rank, and a per-node `adapter-rank`) |
| `max-local-steps` | 10000 | largest number of local steps (or epochs x batches) a round may plan |
| `max-stack-depth` | 1000 | largest FLoRA stack version (`stack-to`) the node will hold |
| `model-path` | none | this node's copy of the base model: replaces the task's model.name_or_path |
| `allow-task-paths` | false | let the task name model.name_or_path, revision, dataset.path |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.privacy.settings import DPSettings
from fedpeft.protocol import ADAPTER_ALPHA, ADAPTER_RANK, STACK_TO
from fedpeft.round_task import RoundTask
from fedpeft.schema import finite_number, integer_in

#: node config key -> (default cap, what it bounds)
LIMITS: dict[str, tuple[int, str]] = {
    "max-batch-size": (1024, "train.batch_size"),
    "max-length": (4096, "train.max_length"),
    "max-rank": (256, "adapter.rank"),
    "max-local-steps": (10_000, "federation.local_steps"),
    "max-stack-depth": (1000, "FLoRA's stack version"),
}
MODEL_PATH, ALLOW_TASK_PATHS = "model-path", "allow-task-paths"
#: task values that make a node read a file or a hub id: (section, key)
PATH_FIELDS = (("model", "name_or_path"), ("model", "revision"), ("dataset", "path"))


class TaskRefused(FedPeftError):
    """The server's task is malformed, out of this node's bounds, or names what the node pins."""


def _refuse_constant(name: str) -> float:
    raise TaskRefused(f"the task holds the JSON constant {name}: every number must be finite")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise TaskRefused(f"the task repeats key(s) {', '.join(repeated)}: each key appears once")
    return dict(pairs)


def parse_task(text: str) -> dict[str, Any]:
    """The task JSON as a dict; NaN, Infinity, repeated keys or a non-object are refused."""
    try:
        task = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise TaskRefused(f"the task is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(task, dict):
        raise TaskRefused(f"the task must be a JSON object, got {type(task).__name__}")
    return task


def node_limits(node_config: Mapping[str, Any]) -> dict[str, int]:
    """This node's caps: LIMITS' defaults, each overridable by its node-config key."""
    limits = {}
    for key, (default, _) in LIMITS.items():
        value = node_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"node config {key}={value!r} must be an integer >= 1")
        limits[key] = value
    return limits


def _section(task: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = task.get(name)
    if not isinstance(value, Mapping):
        raise TaskRefused(f"the task's {name} must be an object, got {type(value).__name__}")
    return value


def _bounded_int(value: object, field: str, cap: int, key: str | None = None, low: int = 1) -> None:
    if not integer_in(value, low, cap):
        where = f" (node config {key})" if key else ""
        raise TaskRefused(
            f"the task's {field}={value!r} must be an integer in [{low}, {cap}]{where}"
        )


def _finite(value: object, field: str, low: float = 0.0) -> None:
    if not finite_number(value) or value < low:
        raise TaskRefused(f"the task's {field}={value!r} must be a finite number >= {low:g}")


def check_task(
    task: Mapping[str, Any], node_config: Mapping[str, Any], *, deployed: bool
) -> RoundTask:
    """Refuse a task this node must not run; return it typed (its DP settings checked).

    `deployed`: the node reads its own model and data (a SuperNode), so task values naming
    files or hub ids are refused unless the node config allows them.
    """
    try:
        dp = DPSettings.from_task(task)
    except ConfigError as exc:
        raise TaskRefused(f"the task's DP settings are refused: {exc}") from None
    limits = node_limits(node_config)
    train, adapter = _section(task, "train"), _section(task, "adapter")
    _bounded_int(train.get("batch_size"), "train.batch_size", limits["max-batch-size"],
                 "max-batch-size")  # fmt: skip
    _bounded_int(train.get("max_length"), "train.max_length", limits["max-length"], "max-length")
    _bounded_int(adapter.get("rank"), "adapter.rank", limits["max-rank"], "max-rank")
    steps, epochs = train.get("local_steps"), train.get("local_epochs")
    if steps is not None:
        _bounded_int(steps, "train.local_steps", limits["max-local-steps"], "max-local-steps")
    if epochs is not None:
        _bounded_int(epochs, "train.local_epochs", limits["max-local-steps"], "max-local-steps")
    typed = round_task(task)  # types, ranges and unknown keys: round_task.py
    if typed.dp != dp:
        raise TaskRefused("the task's DP settings read differently twice")  # cannot happen
    if deployed:
        _check_paths(task, node_config)
        if typed.canaries is not None:
            raise TaskRefused(
                "the task asks this node to train on audit canaries: a deployed node trains on "
                "its own data only (canaries are for simulated audits, `fedpeft audit`)"
            )
    return typed


def round_task(task: Mapping[str, Any]) -> RoundTask:
    """The task typed (round_task.py); any key, type or value it refuses is a TaskRefused."""
    try:
        return RoundTask.from_dict(task)
    except ConfigError as exc:
        raise TaskRefused(f"the task is refused: {exc}") from None


def check_round(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """Bound the round config's own sizes: a per-node rank and FLoRA's stack version."""
    limits = node_limits(node_config)
    if ADAPTER_RANK in config:
        _bounded_int(config[ADAPTER_RANK], ADAPTER_RANK, limits["max-rank"], "max-rank")
    if ADAPTER_ALPHA in config:
        _finite(config[ADAPTER_ALPHA], ADAPTER_ALPHA)
    if STACK_TO in config:
        depth = limits["max-stack-depth"]
        _bounded_int(config[STACK_TO], STACK_TO, depth, "max-stack-depth", low=0)


def _check_paths(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    allowed = node_config.get(ALLOW_TASK_PATHS, False)
    if not isinstance(allowed, bool):
        raise ConfigError(f"node config {ALLOW_TASK_PATHS}={allowed!r} must be true or false")
    if allowed:
        return
    for section, key in PATH_FIELDS:
        if section == "model" and key == "name_or_path" and MODEL_PATH in node_config:
            continue  # pinned: pin_model replaces it with the node's own copy
        value = _section(task, section).get(key)
        if value is not None:
            raise TaskRefused(
                f"the task's {section}.{key}={value!r} names a file or hub id for this node to "
                f"read; a deployed node reads only what its node config names: set node config "
                f'{MODEL_PATH}="<dir>" for the model, or {ALLOW_TASK_PATHS}=true to trust the '
                "server's choice"
            )


def pin_model(task: dict[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The task with the node's own `model-path` in place of the server's model.name_or_path."""
    path = node_config.get(MODEL_PATH)
    if path is None:
        return task
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f'node config {MODEL_PATH}={path!r} must be a directory, e.g. "/m/x"')
    return {**task, "model": {**task["model"], "name_or_path": path, "revision": None}}
