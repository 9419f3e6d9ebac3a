"""The model runtime a process keeps between rounds: the base model with its adapter injected.

Clients and the server build it from the same task description, so every party holds the same base
weights, head initialisation and round-0 adapter. It is loaded once per process and reused across
rounds and across the simulated clients that share a process; each round restores the initial
adapter and then loads the payload, so nothing leaks from one client or round into the next.

Methods that change the base weights (FLoRA merges stacked modules into them) must not leak one
node's base into another node's training either. The runtime keeps a pristine copy of the adapted
layers' base weights (only the target modules, taken at the first merge: one more d_out x d_in
copy per adapted layer, none for methods that never merge), and `reset` restores it before merging
the stacked modules the caller names, one addmm per module and layer: O(v d_out d_in r) work for a
node at base version v, with no d_out x d_in temporary.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

from fedpeft import adapters, lowrank, models


@dataclass
class ModelRuntime:
    """A base model with its adapter injected, its tokenizer, and the round-0 adapter tensors."""

    model: PeftModel
    tokenizer: Any
    initial: dict[str, torch.Tensor]
    device: torch.device
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    base_dirty: bool = False

    def reset(
        self,
        payload: Mapping[str, torch.Tensor],
        stacks: Sequence[Mapping[str, torch.Tensor]] = (),
    ) -> None:
        """Restore the initial adapter and base, merge `stacks` into the base, load the payload.

        Each stacked module maps `<module>.lora_A` (R x d_in) and `<module>.lora_B` (d_out x R) of
        scaling 1; they are merged in order, W0 <- W0 + B A, in float32 and in place.
        """
        self.restore_base()
        for stack in stacks:
            self.merge_stack(stack)
        adapters.write_adapter(self.model, self.initial)
        adapters.write_adapter(self.model, payload)

    def restore_base(self) -> None:
        """Put the pristine base weights back if a merge changed them."""
        if not self.base_dirty:
            return
        with torch.no_grad():
            for name, weight in adapters.base_weights(self.model).items():
                weight.copy_(self.pristine[name])
        self.base_dirty = False

    def merge_stack(self, stack: Mapping[str, torch.Tensor]) -> None:
        """W0 <- W0 + B_stack A_stack for every adapted layer the stacked module names."""
        live = adapters.base_weights(self.model)
        names = {k.rsplit(".", 1)[0] for k in stack}
        unknown = sorted(names - set(live))
        if unknown:
            raise KeyError(f"stacked module names layers this model does not adapt: {unknown[:3]}")
        if not self.pristine:  # first merge in this process: keep the base to restore later
            self.pristine = {n: w.detach().clone() for n, w in live.items()}
        self.base_dirty = True
        with torch.no_grad():
            for name in names:
                weight = live[name]
                lowrank.merge_into_base_(
                    weight.data,
                    stack[f"{name}.lora_B"].to(weight.device),
                    stack[f"{name}.lora_A"].to(weight.device),
                )


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


@functools.lru_cache(maxsize=8)
def _runtime(task_key: str) -> ModelRuntime:
    task = json.loads(task_key)
    spec = model_spec(task)
    device = models.resolve_device(task.get("device"))
    # peft initialises the injected factors from torch's global RNG. Building under a forked RNG
    # keeps the caller's stream where it was, so a cache miss (the first client a process serves)
    # and a hit draw the same dropout masks afterwards; the factors are overwritten anyway.
    with torch.random.fork_rng(devices=[]):
        base = models.load_model(spec, seed=int(task["adapter_seed"]), device=device)
        if not spec.placed:  # a quantised or device-mapped base was placed while loading
            base = base.to(device)
        model = adapters.inject(base, adapter_spec(task))
    initial = adapters.initial_adapter(model, int(task["adapter_seed"]))
    return ModelRuntime(model, models.load_tokenizer(spec), initial, device)


def model_runtime(task: Mapping[str, Any]) -> ModelRuntime:
    """The cached runtime for this task's model and adapter (built on first use in this process).

    One runtime per adapter (rank, alpha, ...): FLoRA clients of different ranks get one each.
    Kinds that inject the same modules (lora, frozen_a, frozen_b) share one, which is frozen for
    the task's kind on every call, so a node whose round task switches kind keeps one model.
    """
    keys = ("model", "num_labels", "adapter", "adapter_seed", "device")
    key = {k: task[k] for k in keys}
    kind = key["adapter"]["kind"]
    key["adapter"] = {**key["adapter"], "kind": adapters.KIND_MODULES.get(kind, kind)}
    runtime = _runtime(json.dumps(key, sort_keys=True))
    adapters.freeze(runtime.model, adapter_spec(task))
    return runtime
