"""The server's part of drift correction: a server optimiser's step and SCAFFOLD's control variate.

Both act right after a method has aggregated a round, on the tensors it keeps as the weighted
average of the replies (x_avg; the method's `server_opt_keys`):
- a server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad; server_opt.py) takes the pseudo-
  gradient Delta = x_avg - x and replaces x_avg by its own step from x;
- SCAFFOLD (Karimireddy et al., ICML 2020, option II) keeps a control variate c on the method's
  up tensors, sent down as `control.<key>`; each client sends its delta c_k back under the same
  key and c += (|S| / N) sum_k p_k delta c_k (p_k: the round's weights; with equal n_k this is
  the paper's mean).
FedProx needs no server part (clients/drift.py). Whether a method composes with these is the
method's own call (`LowRankStrategy.drift_refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft.adapters import CONTROL_PREFIX
from fedpeft.records import TensorSpec
from fedpeft.strategies.server_opt import ServerOptimizer


class ServerDrift:
    """A server optimiser (or none) and SCAFFOLD's c (or none), with their checkpoint state.

    Parameters
    ----------
    server_opt : dict or None
        `ServerOptimizer`'s keywords; None or name "none": plain averaging.
    control_keys : dict or None
        SCAFFOLD's tensors (key -> the global's tensor, for the shape); None: no SCAFFOLD.
    """

    def __init__(
        self,
        server_opt: Mapping[str, Any] | None,
        control_keys: Mapping[str, torch.Tensor] | None,
    ) -> None:
        named = server_opt is not None and server_opt.get("name", "none") != "none"
        self.server_opt = ServerOptimizer(**server_opt) if named else None
        self.scaffold = control_keys is not None
        self.control = {k: torch.zeros_like(v) for k, v in (control_keys or {}).items()}

    def payload(self) -> dict[str, torch.Tensor]:
        """SCAFFOLD's server control variate c as `control.<key>` (empty without SCAFFOLD)."""
        return {f"{CONTROL_PREFIX}{k}": v for k, v in self.control.items()}

    def specs(self) -> dict[str, TensorSpec]:
        """The delta c_k a SCAFFOLD reply must carry, with the shapes of c."""
        return {f"{CONTROL_PREFIX}{k}": TensorSpec(tuple(v.shape)) for k, v in self.control.items()}

    def before(
        self, global_adapter: Mapping[str, torch.Tensor], keys: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors a server optimiser steps from, copied before the method aggregates."""
        if self.server_opt is None:
            return {}
        return {k: global_adapter[k].clone() for k in keys}

    def step(
        self,
        global_adapter: dict[str, torch.Tensor],
        previous: Mapping[str, torch.Tensor],
        deltas: Sequence[Mapping[str, torch.Tensor]],
        weights: torch.Tensor,
        population: int,
    ) -> None:
        """After the method's aggregation: the optimiser's step, then c += |S|/N sum p_k dc_k.

        population: N, the clients the round was sampled from.
        """
        if self.server_opt is not None:
            averaged = {k: global_adapter[k] for k in previous}
            global_adapter.update(self.server_opt.step(previous, averaged))
        if self.scaffold and deltas:
            share = min(1.0, len(deltas) / max(population, 1))
            for key in self.control:
                stacked = torch.stack([d[f"{CONTROL_PREFIX}{key}"].double() for d in deltas])
                mean = torch.einsum("k,k...->...", weights.double(), stacked)
                self.control[key] = (self.control[key].double() + share * mean).float()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta) a resumed server needs: c and the optimiser's m, v, steps."""
        tensors, meta = self.payload(), {}
        if self.server_opt is not None:
            opt_tensors, meta["server_opt"] = self.server_opt.state_dict()
            tensors.update(opt_tensors)
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore `state_dict`; a checkpoint without the run's server optimiser is an error."""
        for key in self.control:
            self.control[key] = tensors[f"{CONTROL_PREFIX}{key}"].float().clone()
        if self.server_opt is not None:
            if "server_opt" not in meta:
                raise ValueError(
                    "the checkpoint has no server optimiser state: resume with server_opt.name=none"
                )
            self.server_opt.load_state_dict(tensors, meta["server_opt"])
