"""Fake grid and replies for driving strategies without a federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

D_IN, D_OUT, R, LAYERS = 16, 12, 4, 3


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def global_adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        tensors[f"enc.{layer}.q.lora_A"] = torch.randn(R, D_IN, generator=g)
        tensors[f"enc.{layer}.q.lora_B"] = torch.randn(D_OUT, R, generator=g)
    tensors["head.classifier.weight"] = torch.randn(2, D_OUT, generator=g)
    tensors["head.classifier.bias"] = torch.randn(2, generator=g)
    return tensors


def reply(node: int, tensors: dict[str, torch.Tensor], num_examples: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 0.5})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=sent)


def error_reply(node: int, reason: str) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=1, reason=reason), reply_to=sent)


def client_updates(keys, k: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = global_adapter()
    return [{key: torch.randn(shapes[key].shape, generator=g) for key in keys} for _ in range(k)]


def reference_average(updates, weights) -> dict[str, torch.Tensor]:
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return {
        key: torch.from_numpy(sum(pk * u[key].double().numpy() for pk, u in zip(p, updates)))
        for key in updates[0]
    }
