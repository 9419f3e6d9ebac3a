"""RoLoRA: alternating LoRA, B trained in odd rounds and A in even ones, each averaged exactly.

Implements docs/algorithms.md §8, after Chen et al., "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA" (NeurIPS 2025; workshop version arXiv 2409.02346). In a B-round
every client trains B on the same frozen A, so (sum p_k B_k) A = sum p_k B_k A; in an A-round every
client trains A under the same frozen B, so B (sum p_k A_k) = sum p_k B A_k. Both need every
participant to start from the same global pair, which is why the phase is a function of the server
round (never of a per-client counter, which drifts under partial participation) and why a client
that missed a round is sent both factors. No server step costs privacy budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft.adapters import FROZEN_PREFIX
from fedpeft.protocol import FROZEN_FROM, FROZEN_VERSION
from fedpeft.strategies.base import LowRankStrategy

#: trained factor -> the adapter kind that trains exactly it
PHASE_KIND = {"lora_B": "frozen_a", "lora_A": "frozen_b"}


def phase(server_round: int) -> str:
    """The factor trained in a 1-based server round: lora_B in odd rounds, lora_A in even ones.

    Round 1 trains B because B = 0 at init makes the gradient of A exactly 0 (an A-first round is
    a no-op).
    """
    if server_round < 1:
        raise ValueError(f"server rounds are 1-based, got {server_round}")
    return "lora_B" if server_round % 2 else "lora_A"


def changed_factors(since: int, until: int) -> list[str]:
    """The factors aggregated in rounds since+1..until: what a node at version `since` lacks."""
    return sorted({phase(t) for t in range(since + 1, until + 1)[:2]})


class RoLoRA(LowRankStrategy):
    """Alternating optimisation of LoRA's factors (RoLoRA).

    Init: peft's (A Kaiming-uniform from the shared seed, B = 0), identical on every client. In
    round t the round's task names the adapter kind: `frozen_a` (B trained) for odd t, `frozen_b`
    (A trained) for even t; clients know the kind, not the method.

    Server: in a B-round B = sum p_k B_k and A is kept bit for bit; in an A-round A = sum p_k A_k
    and B is kept. The head (when trained) is averaged every round. The paper is silent on the
    head and its supplement freezes it; here it is trained unless `adapter.train_head=false`.

    Down: every node keeps its copy of the global A and B in its state (client_state's frozen
    factors, versioned by the round they reflect). A node that took part in round t-1 holds
    version t-2 and is sent only the factor aggregated in t-1 (r d_in or r d_out per layer); a
    node that missed a round, failed, restarted, or after a server resume is sent both factors
    that differ from the seeded init. Plus the head every round. Up: the round's trained factor
    (r d_out on odd rounds, r d_in on even ones) and the head.

    Under DP the trainable set changes every round; the client builds its Opacus optimizer per
    round on what the round's kind trains, and its ledger carries the accountant over.

    Parameters: see `LowRankStrategy`.
    """

    drift_note = (
        "the factor it averages alternates between A and B every round, so one optimiser state "
        "or control variate per tensor would mix its A and B rounds (not composed yet)"
    )
    name = "rolora"
    sums_replies = True
    kind = "frozen_a"
    version_metric = FROZEN_VERSION

    def __init__(
        self, global_adapter: Mapping[str, torch.Tensor], task: Mapping[str, Any], **kwargs
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        if not self.factor_keys("lora_A") or self.factor_keys("lora_R"):
            raise ValueError("rolora needs a plain LoRA adapter (lora_A and lora_B factors)")

    def round_instructions(self, server_round: int) -> dict[str, Any]:
        """The round's adapter kind: frozen_a (B trained) in odd rounds, frozen_b in even ones."""
        adapter = {**self.task.get("adapter", {}), "kind": PHASE_KIND[phase(server_round)]}
        return {**super().round_instructions(server_round), "adapter": adapter}

    def down_keys(self, node_id: int) -> list[str]:
        """The head (when trained); the factors go into the node's state in `node_payload`."""
        return self.head_keys()

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The global factors this node lacks, and the version it must hold after taking them."""
        want = self.server_round - 1
        held = min(self.known_version(node_id), want)
        keys = self.factor_keys(*changed_factors(held, want))
        tensors = {f"{FROZEN_PREFIX}{k}": self.global_adapter[k] for k in keys}
        return tensors, {FROZEN_FROM: held, FROZEN_VERSION: want}

    def up_keys(self) -> list[str]:
        """The round's trained factor and the head (when trained)."""
        return self.factor_keys(phase(self.server_round)) + self.head_keys()

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Trained factor = sum p_k factor_k, head = sum p_k head_k; the other factor unchanged."""
        self.average_into_global(updates, weights)
