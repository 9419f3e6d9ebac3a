"""FedAvg on LoRA (FedIT): clients train A and B, the server averages each factor.

Implements ALGORITHMS.md §1, following Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning" (ICASSP 2024), which applies FedAvg (McMahan et al., AISTATS 2017)
to LoRA factors. Averaging A and B separately is inexact by design (the mean of B_k A_k is not
mean(B) mean(A)); it is the baseline the other methods improve on.
"""

from __future__ import annotations

import torch

from fedpeft.strategies.base import LowRankStrategy


class FedAvgLoRA(LowRankStrategy):
    """FedAvg on LoRA factors.

    Down: the global A and B (and the head when trained) every round, so each client warm-starts
    from the global pair. Up: A_k, B_k (and the head). Server: A = sum p_k A_k, B = sum p_k B_k,
    with p_k proportional to the client's num-examples. Parameters: see `LowRankStrategy`.
    """

    kind = "lora"

    def down_keys(self, node_id: int) -> list[str]:
        """Everything the clients train, from the current global."""
        return self.up_keys()

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """A = sum p_k A_k, B = sum p_k B_k, head = sum p_k head_k."""
        self.average_into_global(updates, weights)
