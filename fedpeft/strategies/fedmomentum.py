"""FedMomentum: the aggregate's top-r SVD part becomes the next LoRA, the rest goes into the base.

Implements docs/algorithms.md §13, after Yan et al., FedMomentum (arXiv 2603.08014; the only code
is the third-party boyi-liu/FedLLM-Factory, `alg/fedmomentum.py`). "Momentum" names the LoRA
update carried from round to round, which re-initialising methods (FLoRA) or frozen factors
(FFA-LoRA) lose. Each round the server forms the exact aggregate dW = sum_k p_k s B_k A_k from the
stacked factors (never as a dense matrix: lowrank.flora_stack and stacked_svd), keeps its best
rank-r part as the next global pair, split evenly between the factors, and merges the components
r+1..r_eff (those holding `energy` of ||dW||_F^2 together with the first r) into the base through
FLoRA's versioned base: every party, clients that missed rounds included, merges the same
modules in order. With energy = 1 the global model is exactly the clients' average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.strategies.fedex_lora import FedExLoRA


class FedMomentum(FedExLoRA):
    """FedMomentum: SVD re-factorisation of the aggregate, the tail merged into the base.

    FedEx-LoRA's exchange (warm-started clients, a versioned base of residual modules sent to
    each node once) with another server step.

    Down: the global A and B (the previous round's top-r part), the head when trained, and the
    residual modules the node lacks (rho_t (d_in + d_out) per layer, rho_t = max(0, r_eff - r)
    <= (K - 1) r). Up: A_k and B_k (and the head). Server, per layer: dW = sum p_k s B_k A_k =
    U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T; the residual U S V^T over
    components r+1..r_eff appended to the base as a module of scaling 1; the head averaged.
    A slot whose singular value is 0 (a layer that did not move) gets a fresh Kaiming-uniform A
    row, seeded by run seed, round and layer, and a zero B column, so that it trains again; the
    product is unchanged.

    Parameters
    ----------
    energy : float (default: 0.9999)
        The share of ||dW||_F^2 kept (the re-implementation's tau): components past it are
        dropped. 1 keeps every component (the global model is then exactly the average).
    **kwargs
        See `LowRankStrategy`; heterogeneous `ranks` are refused (one base takes one residual).
    """

    name = "fedmomentum"
    sums_replies = False
    client_dp_note = (
        "it forms the exact aggregate of each client's product B_k A_k from the stacked "
        "factors, which needs every client's update in the clear"
    )
    kind = "lora"
    #: FedAvg's per-client ranks: one frame (one base) for every client here
    refused_options = frozenset({"ranks", "scaling"})

    def __init__(self, *args, energy: float = 0.9999, **kwargs) -> None:
        self.check_params({"energy": energy, "ranks": kwargs.get("ranks")}, {}, 0)
        super().__init__(*args, **kwargs)
        self.energy = float(energy)
        self.reseeded = 0

    @classmethod
    def check_params(
        cls, params: Mapping[str, Any], strategy: Mapping[str, Any], adapter_rank: int
    ) -> None:
        """One rank for every client (one base takes one residual); energy in (0, 1]."""
        super().check_params(params, strategy, adapter_rank)
        energy = params.get("energy", 0.9999)
        if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
            raise ValueError(
                f"strategy.params.energy={energy} must be in (0, 1], e.g. 0.9999 (1 keeps every "
                "component)"
            )

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Neither composes: every round re-factors the global pair in a new basis."""
        return (
            "each round the server re-factors the aggregate by an SVD, so the global factors are "
            "in a new basis every round, not a persistent average a server optimiser or a "
            "control variate could live on"
        )

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """The head averaged; per layer the top-r pair kept and the residual appended."""
        head = self.head_keys()
        if head:
            self.average_into_global([{k: u[k] for k in head} for u in updates], weights)
        module: dict[str, torch.Tensor] = {}
        k, r = len(updates), self.global_rank
        for names in self.layer_groups():
            a_list = [self.stack_factor(names, "lora_A", u) for u in updates]
            b_list = [self.stack_factor(names, "lora_B", u) for u in updates]
            a_st, b_st = lowrank.flora_stack(a_list, b_list, weights, [self.scale] * k)
            us, vh = lowrank.stacked_svd(a_st, b_st)
            a, b, r_eff, dead = lowrank.fedmomentum_split(us, vh, r, self.scale, self.energy)
            a = self._reseed(names, a, dead)
            self.unstack_factor(names, "lora_A", a.float())
            self.unstack_factor(names, "lora_B", b.float())
            for i, name in enumerate(names):
                tail = int(r_eff[i])
                if tail > r:
                    module[f"{name}.lora_A"] = vh[i, r:tail].float()
                    module[f"{name}.lora_B"] = us[i, :, r:tail].float()
        if module:
            self.add_module(module)

    def _reseed(self, names: list[str], a: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """Fresh Kaiming-uniform rows of A where a slot is dead (B's column there is 0)."""
        if not bool(dead.any()):
            return a
        a = a.clone()
        bound = 1.0 / math.sqrt(a.shape[-1])
        for i, name in enumerate(names):
            for slot in torch.nonzero(dead[i]).flatten().tolist():
                layer = self.layers.index(name)
                run = int(self.task.get("seed", 0))
                seed = run * 1_000_003 + self.server_round * 10_007 + layer * 101 + slot
                gen = torch.Generator().manual_seed(seed % 2**63)
                row = torch.empty(a.shape[-1], dtype=torch.float64).uniform_(
                    -bound, bound, generator=gen
                )
                a[i, slot] = row.to(a.dtype)
                self.reseeded += 1
        return a

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """Every residual module, then (s A, B), joined per layer: one LoRA of scaling 1.

        A layer without a residual in some round has no rows for it; the joined rank is the
        largest over layers, the others zero-padded (zero rows and columns change nothing).
        """
        if not self.stacks:
            return None
        parts: dict[str, tuple[list, list]] = {n: ([], []) for n in self.layers}
        for module in [*self.stacks]:
            for name in self.layers:
                if f"{name}.lora_A" in module:
                    parts[name][0].append(module[f"{name}.lora_A"])
                    parts[name][1].append(module[f"{name}.lora_B"])
        for name in self.layers:
            parts[name][0].append(self.global_adapter[f"{name}.lora_A"] * self.scale)
            parts[name][1].append(self.global_adapter[f"{name}.lora_B"])
        rank = max(sum(a.shape[0] for a in parts[n][0]) for n in self.layers)
        tensors = {}
        for name, (a_parts, b_parts) in parts.items():
            a, b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
            tensors[f"{name}.lora_A"] = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
            tensors[f"{name}.lora_B"] = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        head = {k: v for k, v in self.global_adapter.items() if k.startswith("head.")}
        return {**tensors, **head}, rank
