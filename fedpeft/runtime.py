"""The model runtime a process keeps between rounds: the base model with its adapter injected.

Clients and the server build it from the same task description, so every party holds the same base
weights, head initialisation and round-0 adapter. It is loaded once per process and reused across
rounds and across the simulated clients that share a process; each round restores the initial
adapter and then loads the payload, so nothing leaks from one client or round into the next.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from fedpeft import adapters, models


@dataclass
class ModelRuntime:
    """A base model with its adapter injected, its tokenizer, and the round-0 adapter tensors."""

    model: PeftModel
    tokenizer: Any
    initial: dict[str, torch.Tensor]
    device: torch.device

    def reset(self, payload: Mapping[str, torch.Tensor]) -> None:
        """Restore the initial adapter, then load the round's payload over it."""
        adapters.write_adapter(self.model, self.initial)
        adapters.write_adapter(self.model, payload)


def adapter_spec(task: Mapping[str, Any]) -> adapters.AdapterSpec:
    """The adapter the task describes."""
    a = task["adapter"]
    return adapters.AdapterSpec(
        kind=a["kind"],
        rank=int(a["rank"]),
        alpha=float(a["alpha"]),
        target_modules=tuple(a["target_modules"]),
        train_head=bool(a["train_head"]),
        dropout=float(a.get("dropout", 0.0)),
    )


def model_spec(task: Mapping[str, Any]) -> models.ModelSpec:
    """The base model the task describes."""
    return models.ModelSpec.from_config(task["model"], int(task["num_labels"]))


@functools.lru_cache(maxsize=2)
def _runtime(task_key: str) -> ModelRuntime:
    task = json.loads(task_key)
    spec = model_spec(task)
    device = models.resolve_device(task.get("device"))
    base = models.load_model(spec, seed=int(task["adapter_seed"])).to(device)
    model = adapters.inject(base, adapter_spec(task))
    initial = adapters.initial_adapter(model, int(task["adapter_seed"]))
    return ModelRuntime(model, models.load_tokenizer(spec), initial, device)


def model_runtime(task: Mapping[str, Any]) -> ModelRuntime:
    """The cached runtime for this task's model and adapter (built on first use in this process)."""
    keys = ("model", "num_labels", "adapter", "adapter_seed", "device")
    return _runtime(json.dumps({k: task[k] for k in keys}, sort_keys=True))
