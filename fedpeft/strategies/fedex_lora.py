"""FedEx-LoRA: FedAvg on LoRA plus the averaging residual folded into the base, so it is exact.

Implements docs/algorithms.md §7, after Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact
Aggregation for Federated and Efficient Fine-Tuning of Foundation Models" (ACL 2025). Clients train
plain LoRA (kind `lora`), warm-started from the global (A_bar, B_bar) on the current base. The
server averages A and B as FedAvg does and adds the residual s R, R = sum p_k B_k A_k - B_bar A_bar,
to the base: W0 + s R + s B_bar A_bar = sum_k p_k (W0 + s B_k A_k), the weighted average of the
clients' effective weights, exactly. R = sum_{k<K} p_k (B_k - B_K)(A_k - A_bar) has rank <= (K-1) r
and goes down as fp32 factors of scaling 1 (lowrank.fedex_aggregate), never as a d_out x d_in
matrix, through FLoRA's versioned base (flora.VersionedBase): one residual module per round, merged
in order, in place and in W0's own (nn.Linear) layout, by every party including clients that missed
rounds or restarted, and by the server's evaluator. Decisions of §7: p_k weights (the paper and its
code use 1/K with all clients in every round); the official code's transpose of R (right only for
GPT-2's Conv1D) is not copied; a round with one valid reply has R = 0 and adds no module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.strategies.fedavg import FedAvgLoRA
from fedpeft.strategies.flora import VersionedBase


class FedExLoRA(FedAvgLoRA, VersionedBase):
    """FedEx-LoRA: averaged factors plus each round's residual merged into a versioned base.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        Heterogeneous client ranks, zero-padded to adapter.rank R as in `FedAvgLoRA`
        (strategies/ranks.py). The residual is then taken between the padded replies, so the
        global effective weight is still exactly sum_k p_k (W0 + s_k B_k A_k). None: every client
        trains at adapter.rank (the paper's setting).
    scaling : str (default: "per_rank")
        With `ranks`, the clients' alphas (per_rank or shared, see `FedAvgLoRA`).
    **kwargs
        See `LowRankStrategy`. The head (when trained) is averaged with the p_k weights, as in the
        official code.

    Down: A_bar and B_bar (per layer r (d_in + d_out); with `ranks`, the node's truncation), the
    head when trained, and the residual modules the node lacks, each (K_t - 1) r (d_in + d_out)
    per layer for the K_t valid replies of its round (in the steady state, the previous round's).
    Up: A_k and B_k (and the head). The scaling s = alpha / R (R = adapter.rank) is folded into
    each residual's A factor, so the modules have scaling 1. `export_lora` saves the global model
    as one plain LoRA of scaling 1: every residual module and (s A_bar, B_bar), joined along the
    rank.
    """

    name = "fedex_lora"
    sums_replies = False
    client_dp_note = (
        "its residual sum_k p_k B_k A_k - B A needs each client's product B_k A_k, a full-size "
        "matrix per client outside the sum of factors that is clipped and noised"
    )
    kind = "lora"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = float(self.task.get("adapter", {}).get("alpha", 16))
        self.layers = [k.removesuffix(".lora_A") for k in self.factor_keys("lora_A")]

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """SCAFFOLD composes as in FedAvg; a server optimiser does not (it breaks exactness)."""
        if option == "server_opt":
            return (
                "the residual folded into the base makes the global weight exactly the clients' "
                "average; a server step on (A, B) would either break that identity or, with the "
                "residual recomputed, be cancelled by it: use strategy=fedavg or lora_fair"
            )
        return super().drift_refusal(option, params)

    @property
    def scale(self) -> float:
        """The global adapter's scaling s = alpha / R."""
        return self.alpha / self.global_rank

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """FedAvg's payload for this node, plus the residual modules it lacks."""
        tensors, config = super().node_payload(node_id)
        modules, versions = self.versioned_payload(node_id)
        return {**tensors, **modules}, {**config, **versions}

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """A_bar, B_bar and the head averaged; the residual s R appended as the next base module."""
        updates = self.padded(updates)
        head = self.head_keys()
        if head:
            self.average_into_global([{k: u[k] for k in head} for u in updates], weights)
        module: dict[str, torch.Tensor] = {}
        for names in self.layer_groups():
            a = torch.stack([self.stack_factor(names, "lora_A", u) for u in updates])
            b = torch.stack([self.stack_factor(names, "lora_B", u) for u in updates])
            a_bar, b_bar, residual = lowrank.fedex_aggregate(a, b, weights, self.scale)
            self.unstack_factor(names, "lora_A", a_bar.float())
            self.unstack_factor(names, "lora_B", b_bar.float())
            if residual is not None:
                a_r, b_r = residual
                for name, a_l, b_l in zip(names, a_r.float(), b_r.float(), strict=True):
                    module[f"{name}.lora_A"], module[f"{name}.lora_B"] = a_l, b_l
        if module:
            self.add_module(module)

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """Every residual module, then (s A_bar, B_bar): one LoRA of scaling 1, and the head."""
        if not self.stacks:
            return None
        last = {}
        for name in self.layers:
            last[f"{name}.lora_A"] = self.global_adapter[f"{name}.lora_A"] * self.scale
            last[f"{name}.lora_B"] = self.global_adapter[f"{name}.lora_B"]
        tensors = self.concatenated(self.layers, [last])
        rank = tensors[f"{self.layers[0]}.lora_A"].shape[0]
        head = {k: v for k, v in self.global_adapter.items() if k.startswith("head.")}
        return {**tensors, **head}, rank
