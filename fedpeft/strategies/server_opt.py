"""Server optimisers on the pseudo-gradient of a method's averaged tensors (FedAvgM, FedOpt).

After a method has aggregated a round, the tensors it keeps as the weighted average of the
clients' replies (`LowRankStrategy.server_opt_keys`) are x_avg; with x the global before the round,
the pseudo-gradient is Delta = x_avg - x, and the server optimiser replaces x_avg by its own step
from x (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2; FedAvgM after
Hsu et al., 2019):

    fedavgm:    m <- momentum m + Delta;  x <- x + lr m
    fedadagrad: m <- b1 m + (1 - b1) Delta;  v <- v + Delta^2
    fedadam:    m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2
    fedyogi:    m <- b1 m + (1 - b1) Delta;  v <- v - (1 - b2) Delta^2 sign(v - Delta^2)
    (the three adaptive rules)             x <- x + lr m / (sqrt(v) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (Reddi's Algorithm 2 asks v_{-1} >= tau^2) and no bias
correction (none in the paper). fedavgm with lr = 1 and momentum = 0 is plain averaging.
FedAvgM is torch.optim.SGD(momentum) on -Delta; the three adaptive rules are written out because
torch.optim.Adam corrects bias and places eps differently, and torch has no Yogi. The state (m, v,
the step count) is plain tensors under `state_dict`, so a resumed server continues bit-exactly.
All math runs in float64 per tensor and the result is stored as float32, like the global adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

NAMES = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
#: server learning rate when `server_opt.lr` is null: FedAvgM's lr 1 is FedAvg's step size; the
#: adaptive rules move each coordinate by about lr per round (Reddi et al. tune it over 1e-3..1).
DEFAULT_LR = {"fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-2}
_PREFIX = "server_opt."


def check_settings(
    name: str,
    lr: float | None,
    betas: Sequence[float],
    tau: float,
    momentum: float,
) -> None:
    """Raise ValueError naming the `server_opt.*` field that is out of range."""
    if name not in NAMES:
        raise ValueError(f"server_opt.name={name!r} is unknown: choose one of {', '.join(NAMES)}")
    if lr is not None and not lr > 0:
        raise ValueError(f"server_opt.lr={lr} must be positive (or null for {DEFAULT_LR})")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"server_opt.betas={list(betas)} must be two numbers in [0, 1)")
    if not tau > 0:
        raise ValueError(f"server_opt.tau={tau} must be positive, e.g. 1e-3")
    if not 0 <= momentum < 1:
        raise ValueError(f"server_opt.momentum={momentum} must be in [0, 1), e.g. 0.9")


class ServerOptimizer:
    """One of FedAvgM, FedAdam, FedYogi, FedAdagrad over named tensors (see the module).

    Parameters
    ----------
    name : str
        fedavgm, fedadam, fedyogi or fedadagrad.
    lr : float or None
        Server learning rate eta (None: DEFAULT_LR of the name).
    betas : (float, float)
        beta_1 (momentum of m) and beta_2 (decay of v; unused by fedadagrad) of the adaptive rules.
    tau : float
        The adaptivity tau of the adaptive rules; v starts at tau^2.
    momentum : float
        FedAvgM's server momentum.
    """

    def __init__(
        self,
        name: str,
        lr: float | None = None,
        betas: Sequence[float] = (0.9, 0.99),
        tau: float = 1e-3,
        momentum: float = 0.9,
    ) -> None:
        check_settings(name, lr, betas, tau, momentum)
        if name == "none":
            raise ValueError("server_opt.name=none takes no server optimiser")
        self.name = name
        self.lr = DEFAULT_LR[name] if lr is None else float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.tau = float(tau)
        self.momentum = float(momentum)
        self.steps = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, previous: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new values of `averaged`'s tensors: x + the rule's step on Delta = averaged - x."""
        out = {}
        for key, avg in averaged.items():
            x = previous[key].double()
            delta = avg.double() - x
            m = self.m.get(key, torch.zeros_like(delta))
            if self.name == "fedavgm":
                m = self.momentum * m + delta
                new = x + self.lr * m
            else:
                m = self.beta1 * m + (1 - self.beta1) * delta
                v = self.v.get(key, torch.full_like(delta, self.tau**2))
                square = delta * delta
                if self.name == "fedadagrad":
                    v = v + square
                elif self.name == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * square
                else:
                    v = v - (1 - self.beta2) * square * torch.sign(v - square)
                self.v[key] = v
                new = x + self.lr * m / (v.sqrt() + self.tau)
            self.m[key] = m
            out[key] = new.to(avg.dtype)
        self.steps += 1
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta): m and v per key, the rule and the step count."""
        tensors = {f"{_PREFIX}m.{k}": v for k, v in self.m.items()}
        tensors.update({f"{_PREFIX}v.{k}": v for k, v in self.v.items()})
        return tensors, {"name": self.name, "steps": self.steps}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what `state_dict` gave; a checkpoint of another rule is an error."""
        if meta.get("name") != self.name:
            raise ValueError(
                f"the checkpoint's server optimiser is {meta.get('name')!r}, this run's is "
                f"{self.name!r}: resume with the original server_opt.name"
            )
        self.steps = int(meta["steps"])
        self.m = {
            k.removeprefix(f"{_PREFIX}m."): v.double().clone()
            for k, v in tensors.items()
            if k.startswith(f"{_PREFIX}m.")
        }
        self.v = {
            k.removeprefix(f"{_PREFIX}v."): v.double().clone()
            for k, v in tensors.items()
            if k.startswith(f"{_PREFIX}v.")
        }
