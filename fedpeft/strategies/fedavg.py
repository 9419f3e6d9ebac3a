"""FedAvg on LoRA (FedIT): clients train A and B, the server averages each factor.

Implements ALGORITHMS.md §1, following Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning" (ICASSP 2024), which applies FedAvg (McMahan et al., AISTATS 2017)
to LoRA factors. Averaging A and B separately is inexact by design (the mean of B_k A_k is not
mean(B) mean(A)); it is the baseline the other methods improve on.

With `ranks` set, it is the zero-padding baseline of heterogeneous ranks that FLoRA (Wang et al.,
NeurIPS 2024) compares against (their code's `--zero_padding`): a client of rank r_k trains the
first r_k rows of A and columns of B, and the server averages the replies zero-padded to the global
rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft.records import TensorSpec
from fedpeft.strategies.base import LowRankStrategy


class FedAvgLoRA(LowRankStrategy):
    """FedAvg on LoRA factors.

    Down: the global A and B (and the head when trained) every round, so each client warm-starts
    from the global pair. Up: A_k, B_k (and the head). Server: A = sum p_k A_k, B = sum p_k B_k,
    with p_k proportional to the client's num-examples.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        Heterogeneous client ranks, zero-padded: the i-th node the server samples gets
        ranks[i % len(ranks)] for the whole run (as FLoRA assigns them), each at most the global
        rank R (adapter.rank). Node k receives A[:r_k] and B[:, :r_k] and replies with factors of
        rank r_k, which the server zero-pads to R before averaging. Every party applies its own
        scaling alpha / r, so B is carried in the global frame: sent times r_k / R and received
        times R / r_k, which makes each client's model exactly the rank-r_k truncation of the
        global one. None (the default) is plain FedAvg.
    **kwargs
        See `LowRankStrategy`.
    """

    kind = "lora"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        ranks: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        self.ranks = None if ranks is None else [int(r) for r in ranks]
        a_keys = self.factor_keys("lora_A")
        self.global_rank = self.global_adapter[a_keys[0]].shape[0] if a_keys else 0
        if self.ranks is not None and (
            not self.ranks or min(self.ranks) < 1 or max(self.ranks) > self.global_rank
        ):
            raise ValueError(
                f"strategy.params.ranks={self.ranks} must be positive integers no larger than "
                f"adapter.rank={self.global_rank}: set adapter.rank={max(self.ranks or [1])}"
            )

    def rank_of(self, node_id: int) -> int:
        """This node's rank (the global rank without `ranks`), fixed when first sampled."""
        return self.global_rank if self.ranks is None else self.assign_rank(node_id, self.ranks)

    def down_keys(self, node_id: int) -> list[str]:
        """Everything the clients train, from the current global (truncated in `node_payload`)."""
        return self.head_keys() if self.ranks is not None else self.up_keys()

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """With `ranks`: A[:r_k], B[:, :r_k] r_k / R and the node's rank; else nothing extra."""
        if self.ranks is None:
            return super().node_payload(node_id)
        r = self.rank_of(node_id)
        tensors = {}
        for key in self.factor_keys("lora_A", "lora_B"):
            value = self.global_adapter[key]
            if key.endswith(".lora_A"):
                tensors[key] = value[:r].contiguous()
            else:
                tensors[key] = (value[:, :r] * (r / self.global_rank)).contiguous()
        return tensors, {"adapter-rank": r}

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """A_k (r_k x d_in), B_k (d_out x r_k) and the head."""
        specs = super().up_specs(node_id)
        if self.ranks is None:
            return specs
        r = self.rank_of(node_id)
        for key in self.factor_keys("lora_A", "lora_B"):
            d_out, d_in = specs[key].shape
            specs[key] = TensorSpec((r, d_in) if key.endswith(".lora_A") else (d_out, r))
        return specs

    def zero_pad(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A reply of rank r_k zero-padded to the global rank, B rescaled by R / r_k."""
        padded = {}
        for key, value in update.items():
            if key.endswith(".lora_A"):
                value = torch.nn.functional.pad(value, (0, 0, 0, self.global_rank - len(value)))
            elif key.endswith(".lora_B"):
                r = value.shape[1]
                scaled = value * (self.global_rank / r)
                value = torch.nn.functional.pad(scaled, (0, self.global_rank - r))
            padded[key] = value
        return padded

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """A = sum p_k A_k, B = sum p_k B_k, head = sum p_k head_k (zero-padded with `ranks`)."""
        if self.ranks is not None:
            updates = [self.zero_pad(u) for u in updates]
        self.average_into_global(updates, weights)
