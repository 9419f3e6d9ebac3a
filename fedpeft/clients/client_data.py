"""A client's own training data: its partition of the task's dataset, tokenized once per process."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from fedpeft import data, models
from fedpeft.errors import ConfigError
from fedpeft.runtime import model_spec


@functools.lru_cache(maxsize=4)
def _client_examples(task_key: str, partition_id: int, num_partitions: int) -> list[dict]:
    task = json.loads(task_key)
    source = data.load_text_dataset(task["dataset"], seed=int(task["seed"]))
    part = data.partition_dataset(
        source.train, num_partitions, partition_id, task["partition"], seed=int(task["seed"])
    )
    tokenizer = models.load_tokenizer(model_spec(task))
    return list(data.tokenize(part, tokenizer, int(task["train"]["max_length"])))


def client_examples(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> list[dict]:
    """This node's tokenized training examples: its partition of the task's dataset."""
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(
            "this node has no data: set node config partition-id=<i> num-partitions=<n>"
        )
    keys = ("dataset", "partition", "seed", "model", "num_labels", "train")
    key = json.dumps({k: task[k] for k in keys}, sort_keys=True)
    return _client_examples(
        key, int(node_config["partition-id"]), int(node_config["num-partitions"])
    )
