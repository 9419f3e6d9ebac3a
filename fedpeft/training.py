"""Local training loops (both tasks) and classification evaluation with a low-rank adapter.

A round may train under mixed precision (`train.precision`: bf16 or fp16 autocast, the adapter
factors and optimiser state staying float32) and with gradient checkpointing
(`train.gradient_checkpointing`: activations recomputed in the backward pass instead of kept).
Causal-LM evaluation (generation, exact match, perplexity) lives in fedpeft.causal.evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from fedpeft.errors import ConfigError
from fedpeft.models import warn_slow_bf16
from fedpeft.schema import check_fields, finite_number, integer_in, known_keys, mapping
from fedpeft.tasks import collate

OPTIMIZERS = ("adamw", "sgd")
#: train.precision -> the autocast dtype (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: the attribute prepare_round leaves on the model for the round's loops (train_steps, DP-SGD)
PRECISION_ATTR = "fedpeft_precision"
Example = dict[str, object]


@dataclass(frozen=True)
class TrainResult:
    """What one client's local round produced: mean loss over the steps actually taken.

    `num_examples` is the client's data size (its aggregation weight); `examples_seen` counts the
    examples its steps processed (for throughput).
    """

    loss: float
    steps: int
    num_examples: int
    examples_seen: int = 0


@dataclass(frozen=True)
class TrainSettings:
    """A client round's training settings: the `train` config group plus the round's length.

    The task carries them to every client (`RoundTask.train`); `parse` refuses what a node must
    not run: unknown or missing keys, non-finite or negative rates, unknown optimisers and
    precisions, and a round with neither local_steps nor local_epochs.
    """

    batch_size: int
    lr: float
    head_lr: float | None
    optimizer: str
    weight_decay: float
    momentum: float
    max_length: int
    max_grad_norm: float | None
    precision: str
    gradient_checkpointing: bool
    local_steps: int | None
    local_epochs: float | None

    @classmethod
    def parse(cls, raw: object, where: str = "train") -> TrainSettings:
        """Validate a `train` mapping (every key required) into settings."""
        values = mapping(raw, where)
        names = [f.name for f in fields(cls)]
        known_keys(values, where, names, required=names)

        def rate(key: str, optional: bool = False) -> tuple[str, bool, str]:
            value = values[key]
            ok = (optional and value is None) or (finite_number(value) and value >= 0)
            return key, ok, "a finite number >= 0" + (" (or null)" if optional else "")

        steps, epochs = values["local_steps"], values["local_epochs"]
        check_fields(
            where,
            values,
            [
                ("batch_size", integer_in(values["batch_size"], 1, 2**31), "an integer >= 1"),
                rate("lr"),
                rate("head_lr", optional=True),
                ("optimizer", values["optimizer"] in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
                rate("weight_decay"),
                rate("momentum"),
                ("max_length", integer_in(values["max_length"], 1, 2**31), "an integer >= 1"),
                rate("max_grad_norm", optional=True),
                ("precision", values["precision"] in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
                (
                    "gradient_checkpointing",
                    isinstance(values["gradient_checkpointing"], bool),
                    "true or false",
                ),
                (
                    "local_steps",
                    steps is None or integer_in(steps, 1, 2**31),
                    "an integer >= 1 (or null with local_epochs)",
                ),
                (
                    "local_epochs",
                    epochs is None or (finite_number(epochs) and epochs > 0),
                    "a positive number (or null with local_steps)",
                ),
                (
                    "local_steps",
                    steps is not None or epochs is not None,
                    "set when local_epochs is null",
                ),
            ],
        )
        floats = ("lr", "head_lr", "weight_decay", "momentum", "max_grad_norm", "local_epochs")
        return cls(
            **{k: float(v) if k in floats and v is not None else v for k, v in values.items()}
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able mapping `parse` reads."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def param_groups(model: torch.nn.Module, lr: float, head_lr: float | None) -> list[dict]:
    """Trainable parameters in two groups: the adapter at `lr`, the head at `head_lr` (or lr).

    With a few Adam steps per round a head trained at the adapter's rate swings every logit on
    clients that hold one label, which makes federated rounds oscillate; a lower head rate damps it.
    """
    head, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if "modules_to_save" in name else rest).append(param)
    groups = [{"params": rest, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": head_lr or lr})
    return groups


def make_optimizer(
    params: Sequence[torch.nn.Parameter] | Sequence[dict],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """A fresh optimiser over the trainable parameters (state is local to one round)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer={name!r} is unknown: one of {', '.join(OPTIMIZERS)}")


def planned_steps(
    num_examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None
) -> int:
    """Optimiser steps for one round: `local_steps`, or `local_epochs` passes over the data."""
    if local_epochs:
        return max(1, math.ceil(local_epochs * num_examples / batch_size))
    if not local_steps or local_steps <= 0:
        raise ConfigError("federation.local_steps must be a positive integer (or set local_epochs)")
    return int(local_steps)


def local_round(
    model: torch.nn.Module, train: TrainSettings, num_examples: int
) -> tuple[torch.optim.Optimizer, int]:
    """A client round's fresh optimiser and its planned steps, from the task's train settings.

    It also sets the round's precision and gradient checkpointing on the model (prepare_round).
    """
    prepare_round(model, train.precision, train.gradient_checkpointing)
    groups = param_groups(model, train.lr, train.head_lr)
    optimizer = make_optimizer(
        groups, train.optimizer, train.lr, train.weight_decay, train.momentum
    )
    steps = planned_steps(num_examples, train.batch_size, train.local_steps, train.local_epochs)
    return optimizer, steps


def prepare_round(
    model: torch.nn.Module, precision: str = "fp32", gradient_checkpointing: bool = False
) -> None:
    """Switch gradient checkpointing and the autocast precision to the round's settings.

    Both are per round, since one model serves every client (and task) of a process. Checkpointing
    is transformers' activation checkpointing of every layer, non-reentrant (no input has to
    require grad).
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision={precision!r} is unknown: choose one of {', '.join(PRECISIONS)}"
        )
    setattr(model, PRECISION_ATTR, precision)
    if precision == "bf16" and next(model.parameters()).device.type == "cpu":
        warn_slow_bf16("train.precision")
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(causal, "supports_gradient_checkpointing", False):
        if gradient_checkpointing:
            raise ConfigError(
                f"train.gradient_checkpointing=true but {type(causal).__name__} does not support "
                "it: set train.gradient_checkpointing=false"
            )
        return
    if gradient_checkpointing:
        causal.activation_checkpointing_enable({"use_reentrant": False})
    elif causal.is_activation_checkpointing:
        causal.activation_checkpointing_disable()


def autocast(model: torch.nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast for the round's precision (a no-op context for fp32)."""
    dtype = PRECISIONS[getattr(model, PRECISION_ATTR, "fp32")]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sampler_seed(seed: int, server_round: int, member: int) -> int:
    """The mini-batch sampler's seed of one client's round (distinct per round and client)."""
    return (seed * 1_000_003 + server_round * 10_007 + member) % (2**31)


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def train_steps(
    model: torch.nn.Module,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    seed: int,
    max_grad_norm: float | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Take `steps` optimiser steps on mini-batches of `examples`, reshuffled every pass.

    `penalty`, when given, is a regulariser of the trainable parameters added to every step's loss
    (rank_pruning's tail term); the reported loss is the task loss alone.
    """
    sampler = RandomSampler(examples, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fp16 needs loss scaling (its range is small); a disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(
        device.type, enabled=getattr(model, PRECISION_ATTR, "fp32") == "fp16"
    )
    model.train()
    total, taken, seen = 0.0, 0, 0
    for batch in _cycle(loader):
        if taken == steps:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(model, device):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        objective = loss if penalty is None else loss + penalty()
        scaler.scale(objective).backward()
        if max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
        taken += 1
        seen += len(batch["labels"])
    return TrainResult(
        loss=total / max(taken, 1), steps=taken, num_examples=len(examples), examples_seen=seen
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    num_labels: int,
) -> dict[str, float]:
    """Accuracy, mean loss and macro-F1 over `examples` (batched by length to pad little)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # type: ignore[arg-type]
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    pred, gold = torch.cat(preds), torch.cat(labels)
    return {
        "accuracy": float((pred == gold).float().mean()),
        "loss": loss_sum / len(gold),
        "macro_f1": macro_f1(pred, gold, num_labels),
    }


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in `gold` or `pred`."""
    tp = torch.bincount(gold[pred == gold], minlength=num_labels).double()
    pred_count = torch.bincount(pred, minlength=num_labels).double()
    gold_count = torch.bincount(gold, minlength=num_labels).double()
    present = (pred_count + gold_count) > 0
    f1 = 2 * tp / (pred_count + gold_count).clamp(min=1)
    return float(f1[present].mean())
