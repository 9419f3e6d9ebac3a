"""FedSVD: clients train B only; the server refactorises B_bar A by SVD and replaces A.

Implements docs/algorithms.md §4, after Lee et al., "FedSVD: Adaptive Orthogonalization for Private
Federated Learning with LoRA" (2025). After averaging B, the server takes the SVD of the product
B_bar A = U S V^T and sets B = U S, A = V^T (rank r). The product is unchanged, A gets orthonormal
rows, and the singular values all sit in B. The SVD is computed from the thin factors (QR of B_bar
and A^T, SVD of the r x r core) and never forms the d_out x d_in product; once A has orthonormal
rows a thin SVD of B_bar alone suffices. It is post-processing of the clients' B's, so under DP it
costs no privacy budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.strategies.base import LowRankStrategy


class FedSVD(LowRankStrategy):
    """FedSVD refactorisation of FFA-style updates.

    Parameters
    ----------
    refactor_every : int (default: 1)
        Refactorise every this many rounds; in between, the server only averages B and keeps A.
    **kwargs
        See `LowRankStrategy`. The paper freezes the classification head (shared from a seed), so
        fedpeft's FedSVD config sets `adapter.train_head: false`; set `adapter.train_head=true`
        to train and average it instead.

    Round 0 is B = 0 and A Kaiming-uniform from the shared seed. Down: B and A, both of which
    change every round (and the head when trained). Up: B_k (and the head).
    """

    name = "fedsvd"
    sums_replies = True
    kind = "frozen_a"

    def __init__(self, *args, refactor_every: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if refactor_every < 1:
            raise ValueError(f"strategy.refactor_every={refactor_every} must be >= 1")
        self.refactor_every = refactor_every
        self.a_orthonormal = False

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Neither composes: every refactorisation replaces A and rewrites B in its new basis."""
        return (
            "every refactorisation replaces A and rewrites B in the new basis, so a server "
            "optimiser's moments or a control variate on B would refer to the old basis: use "
            "strategy=ffa_lora (the same exchange with A fixed) for this option"
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The base's state and whether A already has orthonormal rows."""
        tensors, meta = super().state_dict()
        return tensors, {**meta, "a_orthonormal": self.a_orthonormal}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the global B, A and the orthonormality flag."""
        super().load_state_dict(tensors, meta)
        self.a_orthonormal = bool(meta["a_orthonormal"])

    def down_keys(self, node_id: int) -> list[str]:
        """B and the server's current A (and the head when trained)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def up_keys(self) -> list[str]:
        """B and the head (when trained)."""
        return self.factor_keys("lora_B") + self.head_keys()

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """B_bar = sum p_k B_k; then, on refactorisation rounds, B, A <- SVD(B_bar A)."""
        self.average_into_global(updates, weights)
        if self.server_round % self.refactor_every:
            return
        for names in self.layer_groups():
            b, a = lowrank.fedsvd_refactor(
                self.stack_factor(names, "lora_B"),
                self.stack_factor(names, "lora_A"),
                a_orthonormal=self.a_orthonormal,
            )
            self.unstack_factor(names, "lora_B", b)
            self.unstack_factor(names, "lora_A", a)
        self.a_orthonormal = True
