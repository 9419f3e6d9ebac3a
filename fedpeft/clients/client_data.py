"""A client's own training data, tokenized once per process.

A deployed SuperNode trains on its own file, named in its node config: `data-path` (csv, tsv, json,
jsonl or parquet), with `text-column` and `label-column` (default `text` and `label`); for a
causal_lm task a .jsonl of prompt/response objects, whose fields the same two keys name (default
`prompt` and `response`). Its labels
must belong to the server's label set: values are matched to the server's label names, or, when
the server's names are not themselves numbers, taken as label ids 0..num_labels-1. For demos and
simulation a node can instead take its partition of the task's dataset (`partition-id`,
`num-partitions`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedpeft import data, models, tasks
from fedpeft.data.canaries import CanarySet
from fedpeft.data.prompt_pairs import read_pairs
from fedpeft.data.table_files import FILE_FORMATS, as_texts, read_frame, require_column
from fedpeft.data.text_dataset import make_dataset
from fedpeft.errors import ConfigError, DataError
from fedpeft.protocol import NUM_PARTITIONS, PARTITION_ID
from fedpeft.runtime import model_spec

DATA_PATH, TEXT_COLUMN, LABEL_COLUMN = "data-path", "text-column", "label-column"
_TASK_KEYS = ("task", "dataset", "partition", "seed", "model", "num_labels", "train", "canaries")


@functools.lru_cache(maxsize=1)
def _source(dataset_key: str, seed: int) -> data.TextDataset:
    """The task's dataset, read once per process: every simulated node in it partitions it."""
    return data.load_text_dataset(json.loads(dataset_key), seed=seed)


def _partition(task: Mapping[str, Any], partition_id: int, num_partitions: int) -> Any:
    """Partition `partition_id` of `num_partitions` of the task's training split."""
    source = _source(json.dumps(task["dataset"], sort_keys=True), int(task["seed"]))
    return data.partition_dataset(
        source.train, num_partitions, partition_id, task["partition"], seed=int(task["seed"])
    )


@functools.lru_cache(maxsize=4)
def _partition_examples(task_key: str, partition_id: int, num_partitions: int) -> list[dict]:
    task = json.loads(task_key)
    part = _partition(task, partition_id, num_partitions)
    tokenizer = models.load_tokenizer(model_spec(task))
    return tasks.encode(
        task.get("task", "classification"), part, tokenizer, int(task["train"]["max_length"])
    )


def label_ids(values: pd.Series, names: Sequence[str], num_labels: int, where: str) -> list[int]:
    """Map a file's label values onto the server's label ids; any value outside is a DataError.

    A value matches a label name (compared as text), or, when no name is a number, it is taken as
    a label id in 0..num_labels-1.
    """
    missing = int(values.isna().sum())
    if missing:
        raise DataError(f"{where} has {missing} row(s) with an empty label: fill or drop them")
    texts = [_as_text(v) for v in values.tolist()]
    index = {str(n): i for i, n in enumerate(names)}
    if texts and all(t in index for t in texts):
        return [index[t] for t in texts]
    ids_allowed = not any(_is_int(n) for n in names)
    if ids_allowed and all(_is_int(t) and 0 <= int(t) < num_labels for t in texts):
        return [int(t) for t in texts]
    bad = sorted(
        {t for t in texts if t not in index and not (ids_allowed and _in_range(t, num_labels))}
    )
    shown = ", ".join(repr(b) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
    allowed = ", ".join(repr(str(n)) for n in names[:10]) + (" ..." if len(names) > 10 else "")
    ids = f" or ids 0..{num_labels - 1}" if ids_allowed else ""
    raise DataError(
        f"{where} has labels outside the server's label set: {shown}; the server's labels are "
        f"{allowed}{ids}: relabel the file or set the node config label-column to the right column"
    )


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _in_range(text: str, num_labels: int) -> bool:
    return _is_int(text) and 0 <= int(text) < num_labels


@functools.lru_cache(maxsize=4)
def _file_examples(task_key: str, path: str, text_column: str, label_column: str) -> list[dict]:
    task = json.loads(task_key)
    file = Path(path).expanduser()
    fmt = FILE_FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise DataError(
            f"node config data-path={path}: unsupported file type {file.suffix!r}: use one of "
            f"{', '.join(FILE_FORMATS)}"
        )
    hint = "set the node config data-path to this node's csv/tsv/json/jsonl/parquet file"
    frame = read_frame(file, fmt, hint)
    texts = as_texts(
        require_column(frame, text_column, file, 'set node config text-column="<one of them>"')
    )
    labels = require_column(
        frame, label_column, file, 'set node config label-column="<one of them>"'
    )
    names = task.get("label_names") or [str(i) for i in range(int(task["num_labels"]))]
    ids = label_ids(labels, names, int(task["num_labels"]), str(file))
    ds = make_dataset(texts, ids, list(names))
    if len(ds) == 0:
        raise DataError(f"{file} has no rows with text in column {text_column!r}: add some")
    tokenizer = models.load_tokenizer(model_spec(task))
    return list(data.tokenize(ds, tokenizer, int(task["train"]["max_length"])))


@functools.lru_cache(maxsize=4)
def _pair_examples(task_key: str, path: str, prompt_field: str, response_field: str) -> list[dict]:
    """A causal-LM node's own JSONL of prompt/response objects, encoded with the chat template."""
    task = json.loads(task_key)
    file = Path(path).expanduser()
    hint = (
        f"a causal_lm node's data-path is a .jsonl file, one object per line with the string "
        f'fields {prompt_field!r} and {response_field!r} (node config text-column="<prompt '
        f'field>" label-column="<response field>" name them)'
    )
    if file.suffix.lower() != ".jsonl":
        raise DataError(f"node config data-path={path}: {hint}")
    pairs = read_pairs(file, prompt_field, response_field, hint)
    tokenizer = models.load_tokenizer(model_spec(task))
    return tasks.encode("causal_lm", pairs, tokenizer, int(task["train"]["max_length"]))


def client_example_count(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> int:
    """How many examples this node trains on; a partition is counted without tokenizing it.

    Tokenizing keeps every example, so the count is what `client_examples` returns; a simulation
    with a thousand nodes can thus count them all at start-up and tokenize only those sampled.
    """
    if (
        DATA_PATH not in node_config
        and PARTITION_ID in node_config
        and NUM_PARTITIONS in node_config
        and task.get("canaries") is None
    ):
        return len(
            _partition(task, int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS]))
        )
    count = len(client_examples(task, node_config))
    canaries = task.get("canaries")
    if canaries is not None and canaries.get("kind") == "gradient" and PARTITION_ID in node_config:
        held = CanarySet(**canaries).held(
            int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
        )
        count += len(held)  # each gradient canary trains as one example (gradient_canaries.py)
    return count


def client_examples(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> list[dict]:
    """This node's tokenized training examples: its own file, or its partition of the dataset."""
    key = json.dumps(
        {k: task[k] for k in (*_TASK_KEYS, "label_names") if k in task}, sort_keys=True
    )
    if DATA_PATH in node_config:
        if task.get("task") == "causal_lm":
            return _pair_examples(
                key,
                str(node_config[DATA_PATH]),
                str(node_config.get(TEXT_COLUMN, "prompt")),
                str(node_config.get(LABEL_COLUMN, "response")),
            )
        return _file_examples(
            key,
            str(node_config[DATA_PATH]),
            str(node_config.get(TEXT_COLUMN, "text")),
            str(node_config.get(LABEL_COLUMN, "label")),
        )
    if PARTITION_ID not in node_config or NUM_PARTITIONS not in node_config:
        raise ConfigError(
            'this node has no data: set node config data-path="/path/to/its/file.csv" '
            "(its own data) or partition-id=<i> num-partitions=<n> (a partition of the task's "
            "dataset)"
        )
    examples = _partition_examples(
        key, int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    )
    canaries = task.get("canaries")
    if not canaries or canaries.get("kind", "input") != "input":
        return examples  # gradient canaries enter DP-SGD's clipped sum, not the data
    return examples + _canary_examples(
        key, int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    )


@functools.lru_cache(maxsize=4)
def _canary_examples(task_key: str, partition_id: int, num_partitions: int) -> list[dict]:
    """This simulated client's audit canaries (data/canaries.py), appended to its partition."""
    task = json.loads(task_key)
    if task.get("task") != "classification":
        raise ConfigError("audit canaries are built for classification tasks only")
    canaries = CanarySet(**task["canaries"])
    tokenizer = models.load_tokenizer(model_spec(task))
    return canaries.for_client(partition_id, num_partitions, tokenizer, int(task["num_labels"]))


def data_fingerprint(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> str:
    """A name for the data this node trains on, which keys its privacy ledger across runs.

    A node's own file: the SHA-256 of its bytes, so any run (any run id, any task) that trains
    on the same file spends from the same ledger; a changed file is new data with a new ledger.
    A partition: the SHA-256 of what selects it (the task's dataset and partition settings, the
    seed and the partition's index and count), since that is what decides its examples.
    """
    digest = hashlib.sha256()
    if DATA_PATH in node_config:
        digest.update(b"file\0")
        with Path(str(node_config[DATA_PATH])).expanduser().open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        selection = {
            "dataset": task.get("dataset"),
            "partition": task.get("partition"),
            "seed": task.get("seed"),
            PARTITION_ID: node_config.get(PARTITION_ID),
            NUM_PARTITIONS: node_config.get(NUM_PARTITIONS),
        }
        if task.get("canaries") is not None:  # only then: earlier ledgers keep their names
            selection["canaries"] = task["canaries"]
        digest.update(b"partition\0" + json.dumps(selection, sort_keys=True).encode())
    return digest.hexdigest()[:32]
