"""Client-side drift correction: FedProx's proximal term and SCAFFOLD's control variates.

Both act on the tensors this client trains and sends (the adapter kind's factors, and the head
when trained), driven by the task's `client_opt` entry, never by the method's name:

- FedProx (Li et al., MLSys 2020): the local objective gains mu/2 ||theta - theta_0||^2, theta_0
  the values the client started the round from (what it loaded), so each step's gradient gains
  mu (theta - theta_0).
- SCAFFOLD (Karimireddy et al., ICML 2020, option II): the server sends its control variate c
  (`control.<key>`); the node keeps its own c_k in its Flower `Context.state` (zeros when it holds
  none: a new or restarted node). Each step's gradient gains c - c_k; after the K steps the node
  sets c_k+ = c_k - c + (theta_0 - theta_K) / (K lr) and replies delta c_k = c_k+ - c_k.

Both terms are added to `p.grad` by a step pre-hook on the round's torch optimiser, so right
before it moves the parameters. Without DP that is after `train.max_grad_norm` clipping (which
bounds the data gradient only). Under DP the same optimiser is the one Opacus' DPOptimizer wraps:
DPOptimizer.step clips each example's gradient, adds the noise and divides by the expected batch
(pre_step), and only then calls the wrapped optimiser's step, whose pre-hook adds the terms. They
are data-independent given what the client started from and what the server sent, so they stay
outside the per-example clipping and the noise, and the clipping bound on every example's
contribution still holds (tests/clients/test_drift.py checks it).

Option II's c_k+ is the mean corrected gradient of the K steps only under plain SGD (theta moves
by lr times the gradient it is given). With momentum or Adam the step is not lr times the
gradient, so (theta_0 - theta_K) / (K lr) would be on another scale than the gradients it
corrects. fedpeft refuses SCAFFOLD with any optimiser but SGD without momentum (config
validation, and again here); SGD's weight decay is part of the gradient it is given, so it stays
exact. The lr is each parameter group's (the head may have its own, `train.head_lr`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import RecordDict

from fedpeft import adapters
from fedpeft.adapters import CONTROL_PREFIX
from fedpeft.clients.round_feature import Round, RoundFeature, Tensors
from fedpeft.errors import ConfigError
from fedpeft.records import from_record, to_record
from fedpeft.round_task import DriftSettings

_STATE = "fedpeft.scaffold"


def split_control(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a payload into (everything else, SCAFFOLD's c by canonical key)."""
    rest, control = {}, {}
    for key, value in tensors.items():
        if key.startswith(CONTROL_PREFIX):
            control[key.removeprefix(CONTROL_PREFIX)] = value
        else:
            rest[key] = value
    return rest, control


def held_control(state: RecordDict, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """This node's c_k (None when it holds none, i.e. zeros)."""
    if _STATE not in state.array_records:
        return None
    held = from_record(state.array_records[_STATE])
    return held if sorted(held) == sorted(keys) else None


def check_sgd(optimizer: torch.optim.Optimizer) -> None:
    """SCAFFOLD's option II needs plain SGD (see the module); anything else is a ConfigError."""
    plain = isinstance(optimizer, torch.optim.SGD) and all(
        not g.get("momentum") and not g.get("nesterov") for g in optimizer.param_groups
    )
    if not plain:
        raise ConfigError(
            "client_opt.scaffold=true needs train.optimizer=sgd with train.momentum=0: option II's "
            "control variate (theta_0 - theta_K) / (K lr) is the mean gradient only under plain SGD"
        )


class DriftCorrection:
    """Adds mu (theta - theta_0) + (c - c_k) to each trained tensor's gradient before each step.

    Parameters
    ----------
    params : dict[str, torch.nn.Parameter]
        The live trained tensors by canonical key; their current values are theta_0.
    proximal_mu : float
        FedProx's mu (0: no proximal term).
    shift : dict[str, torch.Tensor] or None
        SCAFFOLD's c - c_k per key (None: no SCAFFOLD).
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        proximal_mu: float = 0.0,
        shift: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.params = dict(params)
        self.start = {k: p.detach().clone() for k, p in self.params.items()}
        self.mu = float(proximal_mu)
        self.shift = (
            None
            if shift is None
            else {k: shift[k].to(p.device, p.dtype) for k, p in self.params.items()}
        )
        self.steps = 0
        self.lrs: dict[str, float] = {}
        self.handle: Any = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run before every step of `optimizer` (the torch one, also when Opacus wraps it)."""
        lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        missing = [k for k, p in self.params.items() if id(p) not in lr_of]
        if missing:
            raise ValueError(f"the optimiser does not train {missing[:3]}")
        self.lrs = {k: lr_of[id(p)] for k, p in self.params.items()}
        self.handle = optimizer.register_step_pre_hook(self._before_step)

    def detach(self) -> None:
        """Remove the hook (the optimiser is per round; this keeps tests' optimisers clean)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for key, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() - self.start[key], alpha=self.mu)
            if self.shift is not None:
                p.grad.add_(self.shift[key])
        self.steps += 1

    def control_update(
        self, c: Mapping[str, torch.Tensor], c_k: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c_k+, delta c_k), c_k+ = c_k - c + (theta_0 - theta_K) / (K lr), on CPU in float32.

        No step taken (K = 0): c_k+ = c_k.
        """
        new, delta = {}, {}
        for key, p in self.params.items():
            old = c_k[key].double().cpu()
            if self.steps:
                moved = (self.start[key] - p.detach()).double().cpu()
                value = old - c[key].double().cpu() + moved / (self.steps * self.lrs[key])
            else:
                value = old
            new[key] = value.float()
            delta[key] = (value - old).float()
        return new, delta


def start_round(
    model: torch.nn.Module,
    keys: list[str],
    settings: DriftSettings,
    control: Mapping[str, torch.Tensor],
    state: RecordDict,
    optimizer: torch.optim.Optimizer,
) -> DriftCorrection | None:
    """The round's correction on the trained tensors `keys`, attached to `optimizer` (or None).

    Call it after the payload is loaded (theta_0 is read here) and before training.
    """
    if control and not settings.scaffold:
        raise ConfigError("the payload carries control variates but client_opt.scaffold=false")
    if not settings.enabled:
        return None
    live = adapters.adapter_tensors(model)
    params = {k: live[k] for k in keys}
    shift = None
    if settings.scaffold:
        check_sgd(optimizer)
        if sorted(control) != sorted(keys):
            raise ValueError(
                f"SCAFFOLD's control variates cover {sorted(control)[:3]}..., this client trains "
                f"{sorted(keys)[:3]}...: the server and client disagree on the trained tensors"
            )
        c_k = held_control(state, keys) or {k: torch.zeros_like(control[k]) for k in keys}
        shift = {k: control[k].float() - c_k[k].float() for k in keys}
    correction = DriftCorrection(params, settings.proximal_mu, shift)
    correction.attach(optimizer)
    return correction


def finish_round(
    correction: DriftCorrection | None,
    control: Mapping[str, torch.Tensor],
    state: RecordDict,
) -> dict[str, torch.Tensor]:
    """Detach the hook; with SCAFFOLD keep c_k+ in `state` and return delta c_k (`control.*`)."""
    if correction is None:
        return {}
    correction.detach()
    if correction.shift is None:
        return {}
    keys = list(correction.params)
    c_k = held_control(state, keys) or {k: torch.zeros_like(control[k]) for k in keys}
    new, delta = correction.control_update(control, c_k)
    state[_STATE] = to_record(new)
    return {f"{CONTROL_PREFIX}{k}": v for k, v in delta.items()}


class Drift(RoundFeature):
    """The round feature: SCAFFOLD's c out of the payload, the correction hook, delta c back."""

    def __init__(self, settings: DriftSettings, state: RecordDict) -> None:
        self.settings, self.state = settings, state
        self.control: Tensors = {}
        self.correction: DriftCorrection | None = None

    @classmethod
    def for_round(cls, round_: Round) -> Drift:
        """Every round: a payload with control variates the task did not ask for is refused."""
        return cls(round_.task.client_opt, round_.context.state)

    def receive(self, tensors: Tensors) -> Tensors:
        """Take SCAFFOLD's c (`control.*`) out of the payload."""
        rest, self.control = split_control(tensors)
        return rest

    def before_training(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trained: list[str]
    ) -> None:
        """Attach FedProx's and SCAFFOLD's correction to the optimiser (start_round)."""
        self.correction = start_round(
            model, trained, self.settings, self.control, self.state, optimizer
        )

    def finish(self, tensors: Tensors) -> Tensors:
        """The reply with SCAFFOLD's delta c_k added (finish_round)."""
        return {**tensors, **finish_round(self.correction, self.control, self.state)}
