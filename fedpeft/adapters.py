"""Adapter parameterisations on a Hugging Face model: inject, freeze, read and write factors.

Tensors cross process boundaries under canonical keys that do not depend on peft's wrapper names:
`<module path>.lora_A` (r x d_in), `<module path>.lora_B` (d_out x r), for the `sb` kind
`<module path>.lora_R` (r x r), and `head.<module>.<param>`. The adapter kind, not the aggregation
method, decides which of them a client trains.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError

ADAPTER = "default"
#: kind -> the LoRA factors a client trains and sends up (docs/algorithms.md, "Adapter kinds").
KIND_FACTORS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_A", "lora_B"),
    "frozen_a": ("lora_B",),
    "sb": ("lora_R",),
    "frozen_b": ("lora_A",),
}
#: kind -> the modules it injects; kinds with the same modules share one model per process
#: (runtime.model_runtime freezes it for the task's kind on every call)
KIND_MODULES: dict[str, str] = {"lora": "lora", "frozen_a": "lora", "frozen_b": "lora", "sb": "sb"}
HEAD_PREFIX = "head."
#: payload key prefixes of per-node state (clients/client_state.py): FLoRA's stacked modules,
#: `stack.<version>.<key>`, and frozen factors sent once, `frozen.<key>`
STACK_PREFIX = "stack."
FROZEN_PREFIX = "frozen."
#: SCAFFOLD control variates: the server's c down, a client's delta c_k up (clients/drift.py)
CONTROL_PREFIX = "control."


def linear_lora_types() -> tuple[type, ...]:
    """The LoRA layer types on Linear bases: peft's plain one, and bitsandbytes 8-bit / 4-bit ones.

    peft's `tuners.lora.bnb` imports bitsandbytes unconditionally, and bitsandbytes is an optional
    extra (`fedpeft[quant]`). A quantised layer can only exist once bitsandbytes has been imported
    (transformers does so when it loads a quantised base), so its module is read only then.
    """
    if sys.modules.get("bitsandbytes") is None:
        return (LoraLinear,)
    from peft.tuners.lora import bnb as lora_bnb

    return tuple(
        c
        for c in (
            LoraLinear,
            getattr(lora_bnb, "Linear8bitLt", None),
            getattr(lora_bnb, "Linear4bit", None),
        )
        if c is not None
    )


class SBDown(torch.nn.Sequential):
    """LoRA-SB's down path, A then R: `Sequential(Linear(d_in, r), Linear(r, r))`, no biases.

    It replaces peft's `lora_A` module of an `sb` layer, so peft's forward computes
    B(R(A x)) * scaling. R is a real `nn.Linear` so that Opacus can compute its per-sample
    gradients. `weight` is A's weight, which peft reads for the input dtype.
    """

    @property
    def weight(self) -> torch.nn.Parameter:
        """A's weight (r x d_in)."""
        return self[0].weight


@dataclass(frozen=True)
class AdapterSpec:
    """Shape and training rule of the adapter every party builds identically."""

    kind: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    train_head: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KIND_FACTORS:
            raise ConfigError(
                f"adapter kind {self.kind!r} is unknown: one of {', '.join(KIND_FACTORS)}"
            )
        if self.rank <= 0:
            raise ConfigError(f"adapter.rank={self.rank} must be a positive integer, e.g. 8")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be positive, e.g. 16")
        if not self.target_modules:
            raise ConfigError("adapter.target_modules is empty: name modules, e.g. [query,value]")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout} must be in [0, 1)")

    @property
    def lora_alpha(self) -> float:
        """The alpha given to peft: the `sb` kind always has scaling 1 (alpha = r)."""
        return float(self.rank) if self.kind == "sb" else self.alpha

    @property
    def scaling(self) -> float:
        """LoRA's s = alpha / r (1 for the `sb` kind)."""
        return self.lora_alpha / self.rank

    @property
    def trained_factors(self) -> tuple[str, ...]:
        """The LoRA factor names this kind trains."""
        return KIND_FACTORS[self.kind]


def inject(model: PreTrainedModel, spec: AdapterSpec) -> PeftModel:
    """Wrap `model` with peft LoRA on the target modules and freeze what the kind keeps fixed.

    The classification head is always a peft `modules_to_save` module so that the saved adapter
    carries it; it is trainable only when `spec.train_head`. A causal LM (a model that generates)
    gets peft's CAUSAL_LM task type and has no head.
    """
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM" if model.can_generate() else "SEQ_CLS",
        init_lora_weights=True,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"adapter.target_modules={list(spec.target_modules)} matched no layer of the model "
            f"({exc}): name Linear modules of this architecture, e.g. [query,value] for BERT, "
            "[q_proj,v_proj] for Llama"
        ) from exc
    for name, layer in lora_layers(peft_model).items():
        if not isinstance(layer, linear_lora_types()):
            raise ConfigError(
                f"adapter on {type(layer).__name__} module {name!r} is not supported: fedpeft "
                "exchanges LoRA factors of Linear layers (and under DP-SGD Opacus computes no "
                "per-sample gradients for embeddings); drop it from adapter.target_modules"
            )
    if spec.kind == "sb":
        for layer in lora_layers(peft_model).values():
            down = layer.lora_A[ADAPTER]
            r_module = torch.nn.Linear(spec.rank, spec.rank, bias=False)
            torch.nn.init.zeros_(r_module.weight)
            layer.lora_A[ADAPTER] = SBDown(down, r_module.to(down.weight.device, down.weight.dtype))
    freeze(peft_model, spec)
    return peft_model


def freeze(model: PeftModel, spec: AdapterSpec) -> None:
    """Train exactly the kind's factors (and the head when asked); everything else frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        for factor in spec.trained_factors:
            factor_weight(layer, factor).requires_grad_(True)
    if spec.train_head:
        for param in head_parameters(model).values():
            param.requires_grad_(True)


def _canonical(name: str) -> str:
    """Module path relative to the base model, without peft's wrapper prefix."""
    return name.removeprefix("base_model.model.")


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """Adapted layers by canonical module path, in model order."""
    return {_canonical(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def factor_weight(layer: LoraLayer, factor: str) -> torch.nn.Parameter:
    """The live weight of one factor (lora_A, lora_B or, for `sb` layers, lora_R) of a layer."""
    down = layer.lora_A[ADAPTER]
    if factor == "lora_A":
        return down.weight
    if factor == "lora_B":
        return layer.lora_B[ADAPTER].weight
    if factor == "lora_R" and isinstance(down, SBDown):
        return down[1].weight
    raise KeyError(f"layer has no factor {factor!r}")


def head_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trainable copy of the classification head's parameters, by canonical key."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for pname, param in module.modules_to_save[ADAPTER].named_parameters():
                params[f"{HEAD_PREFIX}{_canonical(name)}.{pname}"] = param
    return params


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every adapter and head tensor under canonical keys (live parameters, not copies)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A"] = factor_weight(layer, "lora_A")
        tensors[f"{name}.lora_B"] = factor_weight(layer, "lora_B")
        if isinstance(layer.lora_A[ADAPTER], SBDown):
            tensors[f"{name}.lora_R"] = factor_weight(layer, "lora_R")
    tensors.update(head_parameters(model))
    return tensors


def select_keys(keys: Iterable[str], factors: Iterable[str], head: bool) -> list[str]:
    """The keys that hold the named factors, plus the head's keys when `head`."""
    suffixes = tuple(f".{f}" for f in factors)
    return [k for k in keys if k.endswith(suffixes) or (head and k.startswith(HEAD_PREFIX))]


def read_adapter(model: PeftModel, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached CPU float32 copies of the named tensors."""
    live = adapter_tensors(model)
    return {k: live[k].detach().to("cpu", torch.float32).clone() for k in keys}


def write_adapter(model: PeftModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into the model in place; unknown keys and wrong shapes are errors."""
    live = adapter_tensors(model)
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in live:
                raise KeyError(f"adapter tensor {key!r} does not exist in this model")
            if tuple(live[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"adapter tensor {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(live[key].shape)}"
                )
            live[key].copy_(value.to(live[key].device, live[key].dtype))


def initial_adapter(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    """The round-0 global adapter: A Kaiming-uniform (peft's default) drawn from `seed`, B = 0.

    R (`sb` layers) is 0 as well. The head is returned as it currently is in the model.

    Each layer gets its own draw from one generator, so the result depends only on the seed and
    the model's layer order, and every party that expands the same seed gets the same A.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = read_adapter(model, adapter_tensors(model).keys())
    for key, value in tensors.items():
        if key.endswith(".lora_A"):
            torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        elif key.endswith((".lora_B", ".lora_R")):
            value.zero_()
    return tensors


def fresh_lora(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    """A fresh LoRA drawn from `seed` (A Kaiming-uniform, B = 0): the factors only, no head."""
    return {k: v for k, v in initial_adapter(model, seed).items() if not k.startswith(HEAD_PREFIX)}


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The live base weights (d_out x d_in) of the adapted layers, by canonical module path."""
    return {name: layer.get_base_layer().weight for name, layer in lora_layers(model).items()}
