"""FlexLoRA: heterogeneous ranks; the server SVDs the average of products and truncates per client.

Implements docs/algorithms.md §9, after Bai et al., "Federated Fine-tuning of Large Language Models
under Heterogeneous Tasks and Client Resources" (NeurIPS 2024; alibaba/FederatedScope, branch
FlexLoRA). Client k trains a LoRA of its own rank r_k at alpha_k (kind `lora`, ranks and alphas
from strategies/ranks.py). The server forms dW = sum_k p_k s_k B_k A_k as FLoRA's stack (s_k p_k
folded into A, lowrank.flora_stack), takes its SVD dW = U S V^T from the stacked factors (QR of
both and an SVD of the sum r_k x sum r_k core; lowrank.stacked_svd, never a dense dW unless
sum r_k >= min(d_out, d_in), where the dense SVD is cheaper), and sends client k
B = (U S)[:, :r_k] / s_k and A = V^T[:r_k]: s_k B A is the best rank-r_k approximation of dW
(Eckart-Young). No trained state is kept on clients between rounds, only the rank. W0 never
changes: the global model is W0 + dW, which the server evaluates and exports.

Decisions of §9, where the official code differs: each s_k is folded explicitly (the code
hard-codes alpha 16 in its merge rate); ranks really are per client (the released script never
applies them); dW is never formed densely on the server for small stacked ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.records import TensorSpec
from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.ranks import RankPlan

_STATE = "flexlora."


class FlexLoRA(LowRankStrategy):
    """FlexLoRA: SVD of the weighted average of client products, truncated to each client's rank.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        LoRA ranks handed to clients in the order the server first samples them (the i-th node
        gets ranks[i % len(ranks)] for the whole run, ranks.RankPlan); each at most
        min(d_out, d_in) of every adapted layer. None gives every client adapter.rank (then the
        method is average of products + SVD, not FedAvg).
    scaling : str (default: "shared")
        The clients' alphas. "shared": alpha_k = alpha for every rank, s_k = alpha / r_k, the
        official code's alpha 16 for every rank. "per_rank": alpha_k = alpha / R * r_k
        (R = adapter.rank), one scaling for every client.
    **kwargs
        See `LowRankStrategy`. The head (when trained) is averaged with the p_k weights.

    Down: the node's rank-r_k factors A = V^T[:r_k] and B = (U S)[:, :r_k] / s_k, per layer
    r_k (d_in + d_out) (nothing in round 1, where every client starts from peft's init at its
    rank), and the head when trained; the config carries the node's rank and alpha. Up: A_k, B_k
    of rank r_k, and the head. Server state: U S and V^T of the last round (rank <= sum r_k).
    When a node's rank exceeds that round's number of singular directions, the extra columns of
    B are 0 and the extra rows of A complete an orthonormal set (seeded by adapter seed and
    round). The global adapter's own LoRA factors are held at B = 0; `base_stacks` is dW as one
    module of scaling 1 (merged into the evaluator's pristine base) and `export_lora` saves it.
    """

    name = "flexlora"
    sums_replies = False
    client_dp_note = (
        "it truncates the SVD of the sum of each client's product B_k A_k, which needs every "
        "client's product, not a noised sum of factors"
    )
    kind = "lora"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        ranks: Sequence[int] | None = None,
        scaling: str = "shared",
        **kwargs,
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        self.plan = RankPlan.unpadded(self.task, ranks, scaling)
        self.alpha = self.plan.alpha
        self.ranks = list(self.plan.ranks)
        self.adapter_seed = int(self.task.get("adapter_seed", 0))
        self.layers = [k.removesuffix(".lora_A") for k in self.factor_keys("lora_A")]
        for name in self.layers:
            d_in = self.global_adapter[f"{name}.lora_A"].shape[1]
            d_out = self.global_adapter[f"{name}.lora_B"].shape[0]
            if max(self.ranks) > min(d_in, d_out):
                raise ValueError(
                    f"strategy.params.ranks={self.ranks} has ranks above {min(d_in, d_out)}, "
                    f"the smaller side of layer {name} ({d_out} x {d_in}): lower them"
                )
            self.global_adapter[f"{name}.lora_B"].zero_()
        self.svd: dict[str, torch.Tensor] = {}

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Neither composes: clients restart from a fresh per-client SVD truncation each round."""
        return (
            "each round the server re-takes the SVD of the average of products and sends every "
            "client its own rank-r_k truncation, so the factors are not an average of a "
            "persistent global (their basis changes every round)"
        )

    def rank_of(self, node_id: int) -> int:
        """This node's rank, assigned to its identity the first time the node is sampled."""
        return self.assign_rank(node_id, self.plan.ranks)

    def down_keys(self, node_id: int) -> list[str]:
        """Only the head (when trained): the factors come truncated in `node_payload`."""
        return self.head_keys()

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained); A and B have the node's rank (see `up_specs`)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """A_k (r_k x d_in), B_k (d_out x r_k) and the head."""
        return self.plan.up_specs(super().up_specs(node_id), self.rank_of(node_id))

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The node's rank-r_k truncation of the last round's SVD, and its rank and alpha."""
        rank = self.rank_of(node_id)
        config = self.plan.node_config(rank)
        if not self.svd:
            return {}, config
        seed = (self.adapter_seed * 1_000_003 + self.server_round * 10_007) % 2**31
        tensors = {}
        for names in self.layer_groups():
            us = torch.stack([self.svd[f"{n}.lora_B"] for n in names])
            vh = torch.stack([self.svd[f"{n}.lora_A"] for n in names])
            generator = torch.Generator().manual_seed(seed)
            a, b = lowrank.flexlora_truncate(us, vh, rank, self.plan.scaling_of(rank), generator)
            for name, a_l, b_l in zip(names, a, b, strict=True):
                tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a_l, b_l
        return tensors, config

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Keep the SVD (U S, V^T) of dW = sum p_k s_k B_k A_k, from its stack; average the head."""
        svd = {}
        for names in self.layer_groups():
            a_list = [self.stack_factor(names, "lora_A", u) for u in updates]
            b_list = [self.stack_factor(names, "lora_B", u) for u in updates]
            scalings = [self.plan.scaling_of(a.shape[-2]) for a in a_list]
            a_stack, b_stack = lowrank.flora_stack(a_list, b_list, weights, scalings)
            us, vh = lowrank.stacked_svd(a_stack, b_stack)
            for name, us_l, vh_l in zip(names, us, vh, strict=True):
                svd[f"{name}.lora_B"], svd[f"{name}.lora_A"] = us_l.contiguous(), vh_l.contiguous()
        self.svd = svd
        head = self.head_keys()
        if head:
            self.average_into_global([{k: u[k] for k in head} for u in updates], weights)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The base's state (ranks handed out included) and the last round's SVD factors."""
        tensors, meta = super().state_dict()
        tensors.update({f"{_STATE}{k}": v for k, v in self.svd.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the base's state and the SVD factors (clients keep no state to resend)."""
        super().load_state_dict(tensors, meta)
        self.svd = {
            k.removeprefix(_STATE): v.clone() for k, v in tensors.items() if k.startswith(_STATE)
        }

    def delta(self) -> dict[str, torch.Tensor]:
        """The global dW as one module of scaling 1, one rank for all layers (empty in round 1)."""
        if not self.svd:
            return {}
        rank = max(self.svd[f"{n}.lora_A"].shape[0] for n in self.layers)
        out = {}
        for name in self.layers:
            a, b = self.svd[f"{name}.lora_A"], self.svd[f"{name}.lora_B"]
            pad = rank - a.shape[0]
            out[f"{name}.lora_A"] = torch.nn.functional.pad(a, (0, 0, 0, pad))
            out[f"{name}.lora_B"] = torch.nn.functional.pad(b, (0, pad))
        return out

    def base_stacks(self) -> list[dict[str, torch.Tensor]]:
        """The global dW = U S V^T as one module of scaling 1 on the pristine base (W0 is fixed)."""
        delta = self.delta()
        return [delta] if delta else []

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The global dW as one plain LoRA of scaling 1 (rank <= sum r_k), and the head."""
        delta = self.delta()
        if not delta:
            return None
        head = {k: v for k, v in self.global_adapter.items() if k.startswith("head.")}
        return {**delta, **head}, delta[f"{self.layers[0]}.lora_A"].shape[0]
