"""FFA-LoRA: A frozen at a shared random init, only B trained and averaged.

Implements docs/algorithms.md §2, after Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning" (ICLR 2024). Because A is identical on every client and never trained, averaging B is
exact: (sum p_k B_k) A = sum p_k B_k A.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft.strategies.base import LowRankStrategy


class FFALoRA(LowRankStrategy):
    """Federated Freeze-A LoRA.

    A is Kaiming-uniform from the run's adapter seed. It never crosses the network: the task carries
    the seed (`adapter_seed`) and every party expands it identically (adapters.initial_adapter),
    which docs/algorithms.md §2 takes in place of sending A once. Down: B (and the head when
    trained). Up: B_k (and the head). Server: B = sum p_k B_k. Its config
    (configs/strategy/ffa_lora.yaml) sets its own alpha, 16, and learning rate, 5e-3 (published
    settings use about 10x LoRA's lr) as defaults of adapter.alpha and train.lr; under DP alpha
    scales B's per-example gradient before clipping (docs/algorithms.md §2). Parameters: see
    `LowRankStrategy`.
    """

    name = "ffa_lora"
    sums_replies = True
    kind = "frozen_a"

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Both compose: B (and the head) is a plain weighted average with A fixed for the run."""
        return None

    def down_keys(self, node_id: int) -> list[str]:
        """The global B (and head); A is expanded from the shared seed."""
        return self.up_keys()

    def up_keys(self) -> list[str]:
        """B and the head (when trained)."""
        return self.factor_keys("lora_B") + self.head_keys()

    def round_instructions(self, server_round: int) -> dict[str, Any]:
        """Tell clients that A comes from the seed, not the payload."""
        return {**super().round_instructions(server_round), "a_from_seed": True}

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """B = sum p_k B_k, head = sum p_k head_k; A unchanged."""
        self.average_into_global(updates, weights)
