"""The optional behaviours of a client's train round, each a `RoundFeature` with the same hooks.

`train_round` (client_app.py) runs the core of a round: read the task, build the model, load the
payload, train, read the reply. Each feature that the round uses joins in at fixed points; the
features are listed once, in `client_app.FEATURES`, and every hook defaults to "nothing to do":

- `for_round`: the feature for this round, or None when the round does not use it;
- `adapter`: the adapter this node trains (rank pruning: its own lower rank);
- `examples`: what the node trains on (local factors: all but the held-out slice);
- `receive`: the payload before it is loaded: take your part, pass on the rest (drift: SCAFFOLD's
  c; client state: stacks and frozen factors; rank pruning: cut to the node's rank);
- `stacks`: modules merged into the base before loading (client state);
- `load`: after the payload is loaded (client state: frozen factors; fresh start; local factors);
- `before_training`: optimiser built, trained keys known (drift: the FedProx/SCAFFOLD hook);
- `penalty`: a data-independent loss term (rank pruning);
- `reply_keys`: which trained tensors go back (local factors stay home);
- `finish`: the reply's tensors, in reverse order like unwinding (rank pruning: cut; drift:
  delta c);
- `metrics`: the reply's metrics (client state: versions; rank pruning: rank).

A new behaviour is one module with a `RoundFeature` subclass and its line in `FEATURES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context

from fedpeft.adapters import AdapterSpec
from fedpeft.privacy.policy import NodePolicy
from fedpeft.round_task import RoundTask

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Round:
    """What a feature may read about the round: its task, config, node context and policy."""

    task: RoundTask
    config: Any  # the round's ConfigRecord (a Mapping)
    context: Context
    policy: NodePolicy
    server_round: int
    member: int


class RoundFeature:
    """One optional behaviour of a train round; every hook here does nothing."""

    @classmethod
    def for_round(cls, round_: Round) -> RoundFeature | None:
        """The feature for this round, or None when the round does not use it."""
        raise NotImplementedError

    def adapter(self, spec: AdapterSpec) -> AdapterSpec:
        """The adapter this node trains this round."""
        return spec

    def examples(self, examples: list[dict]) -> list[dict]:
        """The examples this node trains on this round."""
        return examples

    def receive(self, tensors: Tensors) -> Tensors:
        """Take this feature's part of the payload; the rest goes on."""
        return tensors

    def stacks(self) -> list[Tensors]:
        """Modules to merge into the base weights before the payload is loaded."""
        return []

    def load(self, model: torch.nn.Module) -> None:
        """Write this feature's tensors into the model after the payload is loaded."""

    def before_training(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trained: list[str]
    ) -> None:
        """Set up before the first step (optimiser built, trained keys known)."""

    def penalty(self, model: torch.nn.Module) -> Callable[[], torch.Tensor] | None:
        """A data-independent term of the loss (outside DP's per-example clipping), or None."""
        return None

    def reply_keys(self, model: torch.nn.Module, keys: list[str]) -> list[str]:
        """Which trained tensors go back to the server."""
        return keys

    def finish(self, tensors: Tensors) -> Tensors:
        """The reply's tensors after training."""
        return tensors

    def metrics(self) -> dict[str, Any]:
        """This feature's reply metrics."""
        return {}


def total_penalty(
    features: Sequence[RoundFeature], model: torch.nn.Module
) -> Callable[[], torch.Tensor] | None:
    """The sum of the features' penalties (None when none has one)."""
    terms = [t for t in (f.penalty(model) for f in features) if t is not None]
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return lambda: torch.stack([t() for t in terms]).sum()
